"""Whether a live picture has frozen: a capture card, camera or encoder that keeps sending the same image.

A frozen source repeats one picture: bit-identical frames, frames the decoder repeats (skipped blocks), or
the same picture re-encoded (a paused capture card behind an encoder), which adds fresh compression noise
that is small and spread over the whole picture. A live scene that merely moves little differs from that
in one of two ways, and the detector looks for both at full resolution:

- somewhere, however small, the picture changes by more than noise: the largest per-block change counts,
  not an average over the frame (a small moving object in a still room is motion);
- slow change adds up: each frame is compared with the first frame of the still run (the reference), not
  with the previous frame, so that a slow pan or a slow object moves far enough to count within a fraction
  of a second, where frame-to-frame differences stay below the noise.

Cost: the comparison reads every GRID_STEP_PX-th pixel of every GRID_STEP_PX-th row of one channel (luma,
or green for BGR, which carries most of it), a 480x270 grid for 1080p, and block means of it.
"""

from __future__ import annotations

import cv2
import numpy as np

# Width of the comparison grid, samples: the picture is read every round(W / GRID_WIDTH) pixels, 4 for 1080p,
# 1 for a picture scaled to the model's size (416 px), where objects are small. A moving object smaller than
# the step can slip between samples.
GRID_WIDTH = 480
# Side of a block, grid samples (BLOCK_SAMPLES * GRID_STEP_PX = 32 px of the picture): small enough that a
# small object fills a good part of one, large enough that the block mean averages out compression noise.
BLOCK_SAMPLES = 8
# A block whose mean |difference| from the reference exceeds this (grey levels, 0-255) has changed. A keyframe
# that re-encodes a frozen, noisy picture at crf 30 moved block means by up to 8 (benchmarks/frozen.py: at 6
# and 8 it restarted the still run and the flag came 0.9 s late); motion, compared with the reference rather
# than the previous frame, adds up until it passes any of 5-16 within 0.4 s on every benchmark video.
BLOCK_CHANGE = 12


class FreezeDetector:
    """Whether a live picture has stopped changing: no block of it changed by more than `block_change` grey
    levels (mean |difference| over 32x32 px) from the first frame of the still run, for `after_s` of the
    stream's own time (pts) and at least 2 frames. Timed by pts, not by a frame count, since a live
    stream's real rate is known only once frames come. A change clears the flag on the frame it is seen."""

    def __init__(self, after_s: float, *, block_change: float = BLOCK_CHANGE):
        self.after_s = after_s
        self.block_change = block_change
        self.same = 0  # frames since the reference that match it
        self._since = 0.0  # pts of the reference, the first frame of the current still picture, seconds
        self._reference: np.ndarray | None = None  # uint8 [H / GRID_STEP_PX, W / GRID_STEP_PX]
        self._ndim = 0  # 3: the reference came from BGR (its green), 2: from a luma plane

    def update(self, image: np.ndarray, pts_s: float) -> bool:
        """image: uint8 BGR [H, W, 3] or a luma plane [H, W], at pts_s seconds; True once frozen."""
        step = max(1, round(image.shape[1] / GRID_WIDTH))
        grid = np.ascontiguousarray(image[::step, ::step, 1] if image.ndim == 3 else image[::step, ::step])
        # green of BGR and luma are not the same numbers: a change of kind (or of size) starts afresh
        same_kind = self._reference is not None and self._reference.shape == grid.shape and self._ndim == image.ndim
        if same_kind and not self._changed(grid):
            self.same += 1
        else:
            self.same, self._since, self._reference, self._ndim = 0, pts_s, grid, image.ndim
        return self.same >= 2 and pts_s - self._since >= self.after_s - 1e-9

    def _changed(self, grid: np.ndarray) -> bool:
        """Whether any block of `grid` differs from the reference by more than block_change on average."""
        grid_h, grid_w = grid.shape
        blocks_hw = (max(1, grid_h // BLOCK_SAMPLES), max(1, grid_w // BLOCK_SAMPLES))
        # An area resize of the |difference| is the mean of each block, in one pass of OpenCV's SIMD code.
        block_means = cv2.resize(cv2.absdiff(grid, self._reference), blocks_hw[::-1], interpolation=cv2.INTER_AREA)
        return int(block_means.max()) > self.block_change
