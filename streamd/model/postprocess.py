"""From the model's raw output to detections in source pixels.

The ONNX graph already decodes YOLOX's grid (DESIGN contract 1): its output
is float32 [N, A, 5 + C] with `cx, cy, w, h` in letterboxed input pixels,
then objectness, then C class scores, all after the sigmoid. What is left is
YOLOX's `postprocess`: score = objectness x best class score, a confidence
threshold, and class-aware NMS.

A row that could not be published as JSON or drawn (a NaN or infinite value
anywhere in it) and a box with no area (zero or negative width or height,
before or after clipping to the frame) are dropped and counted
(`Decoded.invalid_boxes`), so that a broken model never reaches a message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.model.detections import Detections


YOLOX_STRIDES = (8, 16, 32)  # the head's output strides


def yolox_anchors(input_hw: tuple[int, int]) -> int:
    """The anchors (rows of the output) of a YOLOX head at input_hw: the sum over strides of (H/s) * (W/s)."""
    height, width = input_hw
    return sum((height // stride) * (width // stride) for stride in YOLOX_STRIDES)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] against many xyxy boxes [M, 4] -> float32 [M]."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a [N, 4] against b [M, 4] -> [N, M], in the inputs' dtype (0 where neither has area)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def nms(xyxy: np.ndarray, scores: np.ndarray, class_id: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware greedy NMS; returns the indices kept, best score first.

    Boxes of different classes never suppress each other: each class is
    shifted by its own offset larger than any coordinate (torchvision's
    `batched_nms` trick), so one pass serves all classes.
    """
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    offset = class_id.astype(np.float32)[:, None] * (float(np.abs(xyxy).max()) + 1.0)
    shifted = xyxy + offset
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best = order[0]
        keep.append(best)
        if order.size == 1:
            break
        rest = order[1:]
        order = rest[box_iou(shifted[best], shifted[rest]) <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A batch's detections (one per image, source-frame pixels) and, per image, the rows dropped as invalid
    (non-finite values, or a box without area): the caller counts them (metrics counter "invalid_boxes")."""

    detections: list[Detections]
    invalid_boxes: tuple[int, ...]

    @classmethod
    def uncounted(cls, detections: list[Detections]) -> Decoded:
        """Detections whose invalid rows were dropped without being counted (a device's NMS): invalid_boxes 0."""
        return cls(detections, (0,) * len(detections))


def _has_area(xyxy: np.ndarray) -> np.ndarray:
    """bool [M]: the xyxy boxes [M, 4] whose width and height are both > 0 (False for NaN)."""
    return (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])


def decode_output(
    output: np.ndarray,
    scales: np.ndarray,
    source_hw: list[tuple[int, int]],
    conf_threshold: float,
    iou_threshold: float,
) -> Decoded:
    """Turn a float32 [N, A, 5 + C] output into N Detections in source-frame pixels, and the invalid rows dropped.

    scales[i] is the letterbox scale of image i; source_hw[i] its (height, width),
    used to clip the boxes to the frame.
    """
    if output.ndim != 3 or output.shape[2] < 6:
        raise ValueError(f"expected model output [N, A, 5 + C], got shape {output.shape}")
    results, invalid = [], []
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and infinite rows are found and dropped below
        for i in range(output.shape[0]):
            rows = output[i]
            finite = np.isfinite(rows).all(axis=1)
            class_scores = rows[:, 5:]
            class_id = np.where(finite, class_scores.argmax(axis=1), 0)
            confidence = rows[:, 4] * class_scores[np.arange(len(rows)), class_id]
            mask = finite & (confidence >= conf_threshold)
            cxcywh = rows[mask, :4]
            xyxy = np.empty_like(cxcywh)
            xyxy[:, :2] = cxcywh[:, :2] - cxcywh[:, 2:] / 2
            xyxy[:, 2:] = cxcywh[:, :2] + cxcywh[:, 2:] / 2
            valid = np.isfinite(xyxy).all(axis=1) & _has_area(xyxy)  # w, h of 1e38 overflow to inf
            dropped = int((~finite).sum() + (~valid).sum())
            xyxy, confidence, class_id = xyxy[valid], confidence[mask][valid], class_id[mask][valid]
            keep = nms(xyxy, confidence, class_id, iou_threshold)
            xyxy = xyxy[keep] / scales[i]
            height, width = source_hw[i]
            np.clip(xyxy[:, 0::2], 0, width, out=xyxy[:, 0::2])
            np.clip(xyxy[:, 1::2], 0, height, out=xyxy[:, 1::2])
            inside = _has_area(xyxy)  # a box wholly outside the frame is clipped to nothing
            invalid.append(dropped + int((~inside).sum()))
            results.append(Detections(xyxy[inside], confidence[keep][inside], class_id[keep][inside]))
    return Decoded(results, tuple(invalid))


def postprocess(
    output: np.ndarray,
    scales: np.ndarray,
    source_hw: list[tuple[int, int]],
    conf_threshold: float,
    iou_threshold: float,
) -> list[Detections]:
    """decode_output's detections alone (N Detections in source-frame pixels), for callers that count nothing."""
    return decode_output(output, scales, source_hw, conf_threshold, iou_threshold).detections
