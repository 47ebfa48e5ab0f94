"""Draw detections on a frame: boxes, "label score" tags, an optional timestamp.

OpenCV only, since it runs on every frame in the daemon's annotator stage and
in `trainer predict`. It draws on a copy: frames crossing a queue are
read-only, and the caller's array is never touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from streamd.model.detections import Detections

# Twenty BGR colours, ordered so that the first few classes differ most (red, green, blue, orange, ...);
# class i always gets PALETTE_BGR[i % 20], so a class keeps its colour across frames, runs and machines.
PALETTE_BGR: tuple[tuple[int, int, int], ...] = (
    (56, 56, 255), (10, 249, 72), (255, 115, 100), (29, 178, 255), (255, 56, 203),
    (187, 212, 0), (49, 210, 207), (236, 24, 0), (151, 157, 255), (52, 147, 26),
    (255, 194, 0), (31, 112, 255), (133, 0, 82), (134, 219, 61), (168, 153, 44),
    (147, 69, 52), (255, 56, 132), (200, 149, 255), (199, 55, 255), (23, 204, 146),
)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(class_id: int, colors: Sequence[tuple[int, int, int]] = PALETTE_BGR) -> tuple[int, int, int]:
    """The BGR colour of a class id (cycling through `colors`)."""
    return tuple(int(v) for v in colors[int(class_id) % len(colors)])


def _text_color(background_bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light backgrounds, white on dark ones (Rec. 601 luma)."""
    blue, green, red = background_bgr
    return (0, 0, 0) if 0.114 * blue + 0.587 * green + 0.299 * red > 140 else (255, 255, 255)


def _tag_height(text: str, scale: float, thickness: int) -> int:
    """The height in pixels of the filled box _tag writes `text` on."""
    (_, text_h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    return text_h + baseline + 2 * max(1, thickness)


def _tag(
    image: np.ndarray, text: str, x: int, y_bottom: int, color: tuple[int, int, int], scale: float, thickness: int,
    min_top: int = 0,
) -> None:  # fmt: skip
    """Write `text` on a filled box whose bottom-left corner is (x, y_bottom), in place; a box that would start
    above row `min_top` is moved down to start there."""
    (text_w, text_h), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    pad = max(1, thickness)
    top = y_bottom - text_h - baseline - 2 * pad
    if top < min_top:  # no room above: move the tag down, below the top band
        y_bottom, top = y_bottom + min_top - top, min_top
    cv2.rectangle(image, (x, top), (x + text_w + 2 * pad, y_bottom), color, cv2.FILLED)
    cv2.putText(image, text, (x + pad, y_bottom - baseline - pad), FONT, scale, _text_color(color), thickness, cv2.LINE_AA)


def _dashed_rectangle(
    canvas: np.ndarray, top_left: tuple[int, int], bottom_right: tuple[int, int], color: tuple[int, int, int], thickness: int
) -> None:
    """A rectangle of dashes (a tentative track's box): dashes of about 1/20 of the frame's short side, gaps the same."""
    dash = max(4, min(canvas.shape[:2]) // 60)
    (x1, y1), (x2, y2) = top_left, bottom_right
    for start in range(x1, x2 + 1, 2 * dash):
        end = min(start + dash, x2)
        cv2.line(canvas, (start, y1), (end, y1), color, thickness)
        cv2.line(canvas, (start, y2), (end, y2), color, thickness)
    for start in range(y1, y2 + 1, 2 * dash):
        end = min(start + dash, y2)
        cv2.line(canvas, (x1, start), (x1, end), color, thickness)
        cv2.line(canvas, (x2, start), (x2, end), color, thickness)


def draw_detections(
    image_bgr: np.ndarray,
    detections: Detections,
    class_names: Sequence[str],
    colors: Sequence[tuple[int, int, int]] | None = None,
    timestamp_text: str | None = None,
    status: tuple[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """An annotated copy of a uint8 HxWx3 BGR frame; the input (possibly read-only) is not modified.

    detections: boxes in this frame's pixels (xyxy). Each box is outlined in
    its class colour with a "label score" tag above it; a class id without a
    name is shown as its number. With track columns (a stream's tracker), a
    confirmed track's box is drawn solid and twice as thick with "#id label
    score", a tentative one (not yet N of its last M frames) dashed and thin
    with "label score?". colors: BGR per class id (cycled), default
    PALETTE_BGR. timestamp_text: written top-left on a black box when given.
    status: (text, BGR colour) of a small marker written top-right ("AI active", "AI stale").
    The band these two take at the top is kept clear: a box's tag that would reach into it is moved below it,
    and they are written last, so that no box line crosses the stream id / frame / time.
    """
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 BGR image, got {image_bgr.dtype} {image_bgr.shape}")
    canvas = np.array(image_bgr, order="C", copy=True)
    palette = colors if colors else PALETTE_BGR
    # Line width and text size follow the frame size so that tags stay legible from 320p to 4K.
    thickness = max(1, round(min(canvas.shape[:2]) / 360))
    scale = max(0.35, min(canvas.shape[:2]) / 1000)
    band = max((_tag_height(text, scale, thickness) for text in (timestamp_text, status and status[0]) if text),
               default=0)  # fmt: skip
    count = len(detections)
    track_ids = detections.track_id if detections.track_id is not None else np.full(count, -1, np.int64)
    confirmed = detections.confirmed if detections.confirmed is not None else np.ones(count, bool)
    for (x1, y1, x2, y2), score, class_id, track_id, sure in zip(
        np.rint(detections.xyxy).astype(np.int32), detections.confidence, detections.class_id, track_ids, confirmed
    ):
        color = class_color(class_id, palette)
        label = class_names[class_id] if 0 <= class_id < len(class_names) else str(int(class_id))
        if sure:
            line = thickness * 2 if detections.confirmed is not None else thickness
            cv2.rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), color, line)
            text = f"{label} {score:.2f}" if track_id < 0 else f"#{track_id} {label} {score:.2f}"
        else:
            _dashed_rectangle(canvas, (int(x1), int(y1)), (int(x2), int(y2)), color, max(1, thickness // 2))
            text = f"{label} {score:.2f}?"
        _tag(canvas, text, int(x1), int(y1), color, scale, thickness, min_top=band)
    if timestamp_text:
        _tag(canvas, timestamp_text, 0, 0, (0, 0, 0), scale, thickness)  # pushed down to sit at the top edge
    if status:
        text, color = status
        (text_w, _), _ = cv2.getTextSize(text, FONT, scale, thickness)
        _tag(canvas, text, canvas.shape[1] - text_w - 2 * max(1, thickness), 0, color, scale, thickness)
    return canvas
