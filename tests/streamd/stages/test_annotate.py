"""streamd.stages.annotate: an annotated copy, the source frame untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamd.model.detections import Detections
from streamd.stages.annotate import AI_ACTIVE, AI_STALE, AnnotateStage, timestamp_text
from streamd.types import AnnotatedFrame
from tests.streamd import media

BOX = Detections(
    np.asarray([[100, 60, 200, 160]], np.float32), np.asarray([0.8], np.float32), np.asarray([1], np.int64)
)


@pytest.mark.parametrize(
    ("class_names", "draw_timestamp", "detections", "box_drawn", "stamp_drawn"),
    [
        (media.MODEL.class_names, True, BOX, True, True),
        ((), True, BOX, True, True),  # no names given: the model's
        (media.MODEL.class_names, False, BOX, True, False),
        (media.MODEL.class_names, True, Detections.empty(), False, True),
    ],
)
def test_draws_on_a_copy(
    class_names: tuple[str, ...], draw_timestamp: bool, detections: Detections, box_drawn: bool, stamp_drawn: bool
) -> None:
    frame = next(media.synthetic_frames(1, size=(320, 240)))
    before = frame.image.copy()
    result = media.frame_result(frame, detections)
    stage = AnnotateStage(class_names, draw_timestamp=draw_timestamp)
    stage.setup()
    (annotated,) = stage.process(result)
    stage.close()
    assert isinstance(annotated, AnnotatedFrame) and annotated.result is result
    assert annotated.image.shape == frame.image.shape and not annotated.image.flags.writeable
    np.testing.assert_array_equal(frame.image, before)  # the source pixels are untouched
    changed = np.any(annotated.image != frame.image, axis=2)
    assert changed[60:161, 100:201].any() == box_drawn  # the box outline and its tag
    assert changed[:8, :60].any() == stamp_drawn  # the timestamp sits top-left
    assert not changed[200:, 260:].any()  # nothing elsewhere


def test_timestamp_text() -> None:
    frame = next(media.synthetic_frames(1, pts_s=[41.1334]))
    result = media.frame_result(dataclasses.replace(frame, seq=1234, decoded_at=1_800_000_000.1234))
    assert timestamp_text(result) == "eus-1 #1234  pts 41.133 s  2027-01-15 08:00:00.123 UTC"


def test_annotated_frame_must_match_its_frame() -> None:
    result = media.frame_result(next(media.synthetic_frames(1, size=(320, 240))))
    with pytest.raises(ValueError, match="annotated image"):
        AnnotatedFrame(result, np.zeros((10, 10, 3), np.uint8))


def _with_total(result, total_ms: float):
    return dataclasses.replace(result, latency=dataclasses.replace(result.latency, total_ms=total_ms))


@pytest.mark.parametrize(
    ("total_ms", "marker_bgr", "boxes_drawn"),
    [(40.0, AI_ACTIVE[1], True), (400.0, AI_STALE[1], False)],
    ids=["fresh: AI active, boxes", "stale: AI stale, no boxes"],
)
def test_the_ai_marker_and_a_stale_result_is_never_drawn(total_ms: float, marker_bgr, boxes_drawn: bool) -> None:
    frame = next(media.synthetic_frames(1, size=(320, 240)))
    result = _with_total(media.frame_result(frame), total_ms)
    (annotated,) = AnnotateStage(media.MODEL.class_names, draw_timestamp=False, max_age_ms=150).process(result)
    corner = annotated.image[:12, -40:].reshape(-1, 3)
    assert (corner == marker_bgr).all(axis=1).sum() > 50  # the marker's box, top-right, in its colour
    body = annotated.image[30:, :280] != frame.image[30:, :280]  # below the markers: boxes only
    assert body.any() == boxes_drawn


def test_no_marker_without_a_budget() -> None:
    frame = next(media.synthetic_frames(1, size=(320, 240)))
    (annotated,) = AnnotateStage(media.MODEL.class_names, draw_timestamp=False).process(_with_total(media.frame_result(frame), 9999))
    assert (annotated.image[:12, -40:] == frame.image[:12, -40:]).all()
