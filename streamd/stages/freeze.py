"""Whether a live picture has frozen: a capture card or camera that keeps sending the same image."""

from __future__ import annotations

import cv2
import numpy as np


class FreezeDetector:
    """Whether a live picture has stopped changing: a 16x9 thumbnail equal (mean |difference| < 1 grey level)
    to the last one for `after_s` of the stream's own time (pts), and for at least 2 frames. A frozen capture
    card or screen repeats the same image. Timed by pts, not by a frame count, since a live stream's real
    rate is known only once frames come."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self.same = 0
        self._since = 0.0  # pts of the first frame of the current still picture
        self._last: np.ndarray | None = None

    def update(self, image: np.ndarray, pts_s: float) -> bool:
        """image: uint8 BGR [H, W, 3] or a luma plane [H, W], at pts_s seconds; True once frozen."""
        # Every 8th pixel is plenty for a 16x9 thumbnail and spares an area-average of every pixel of every frame.
        thumbnail = cv2.resize(image[::8, ::8], (16, 9), interpolation=cv2.INTER_AREA).astype(np.int16)
        same_kind = self._last is not None and self._last.shape == thumbnail.shape  # BGR or a Y plane
        if same_kind and np.abs(thumbnail - self._last).mean() < 1.0:
            self.same += 1
        else:
            self.same, self._since = 0, pts_s
        self._last = thumbnail
        return self.same >= 2 and pts_s - self._since >= self.after_s - 1e-9
