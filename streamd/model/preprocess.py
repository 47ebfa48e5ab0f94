"""Letterbox preprocessing, exactly as YOLOX's `ValTransform` does it.

YOLOX resizes the image by r = min(H / h, W / w) with bilinear
interpolation, puts it in the top-left corner of an `input_hw` canvas filled
with 114, keeps OpenCV's BGR order, and feeds raw 0-255 values (no mean/std,
`legacy=False`). Boxes come back in that canvas; dividing by r maps them to
the source frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from streamd.model.bundle import Preprocess


@dataclass(frozen=True, slots=True)
class Letterbox:
    """One letterboxed image: CHW float32 tensor and the scale that made it."""

    tensor: np.ndarray  # float32 [3, H, W]
    scale: float  # input pixels per source pixel


def letterbox_hw(source_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int, float]:
    """(h, w, r): the size a source (H, W) image takes inside an input_hw letterbox, r = min(H_in / H, W_in / W).

    ValueError when a side would be 0 pixels: an image more than input_hw's side times wider than tall, or
    taller than wide (1920x4 into 416x416), or an image without pixels. Nothing can letterbox such a frame.
    """
    height, width = source_hw
    if height < 1 or width < 1:
        raise ValueError(f"a {width}x{height} image has no pixels")
    scale = min(input_hw[0] / height, input_hw[1] / width)
    new_h, new_w = int(height * scale), int(width * scale)
    if new_h < 1 or new_w < 1:
        raise ValueError(
            f"a {width}x{height} image cannot be letterboxed into {input_hw[1]}x{input_hw[0]}: "
            f"it would be {new_w}x{new_h} pixels"
        )
    return new_h, new_w, scale


def _place(image_bgr: np.ndarray, input_hw: tuple[int, int], pad_value: int) -> tuple[np.ndarray, float]:
    """The uint8 HxWx3 canvas: the image resized by r = min(H / h, W / w) top-left, the rest pad_value; and r."""
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image_bgr.dtype} {image_bgr.shape}")
    new_h, new_w, scale = letterbox_hw(image_bgr.shape[:2], input_hw)
    canvas = np.full((input_hw[0], input_hw[1], 3), pad_value, dtype=np.uint8)
    if (new_h, new_w) == image_bgr.shape[:2]:
        canvas[:new_h, :new_w] = image_bgr  # already the letterbox's size (decoded for the model): pad only
    else:
        canvas[:new_h, :new_w] = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return canvas, scale


def _to_tensor(canvas: np.ndarray, preprocess: Preprocess, out: np.ndarray) -> None:
    """Write the canvas into `out` (float32 [3, H, W]) in the model's channel order and scaling, in one pass."""
    out[...] = (canvas[:, :, ::-1] if preprocess.channel_order == "rgb" else canvas).transpose(2, 0, 1)
    if preprocess.mean is not None:
        out -= np.asarray(preprocess.mean, np.float32).reshape(3, 1, 1)
    if preprocess.std is not None:
        out /= np.asarray(preprocess.std, np.float32).reshape(3, 1, 1)
    if preprocess.scale != 1.0:
        out *= preprocess.scale


def letterbox(image_bgr: np.ndarray, input_hw: tuple[int, int], preprocess: Preprocess = Preprocess()) -> Letterbox:
    """Letterbox one HxWx3 uint8 BGR image into a float32 [3, H, W] tensor."""
    canvas, scale = _place(image_bgr, input_hw, preprocess.pad_value)
    tensor = np.empty((3, input_hw[0], input_hw[1]), dtype=np.float32)
    _to_tensor(canvas, preprocess, tensor)
    return Letterbox(tensor=tensor, scale=scale)


def letterbox_batch(
    images_bgr: list[np.ndarray], input_hw: tuple[int, int], preprocess: Preprocess = Preprocess()
) -> tuple[np.ndarray, np.ndarray]:
    """Letterbox a list of images into one float32 [N, 3, H, W] batch (written in place) and float32 [N] scales."""
    batch = np.empty((len(images_bgr), 3, input_hw[0], input_hw[1]), dtype=np.float32)
    scales = np.empty(len(images_bgr), dtype=np.float32)
    for i, image in enumerate(images_bgr):
        canvas, scales[i] = _place(image, input_hw, preprocess.pad_value)
        _to_tensor(canvas, preprocess, batch[i])
    return batch, scales
