"""streamd.draw: annotated copies, never a write into the caller's frame."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.draw import PALETTE_BGR, class_color, draw_detections
from streamd.model.detections import Detections

NAMES = ("lesion", "landmark")


def frame(read_only: bool) -> np.ndarray:
    image = np.full((240, 320, 3), 40, np.uint8)
    image[:, 160:] = 200  # a dark half and a light half, for both tag text colours
    image.setflags(write=not read_only)
    return image


BOXES = Detections(
    np.asarray([[40, 60, 140, 180], [200, 0, 300, 90], [0, 0, 30, 30]], np.float32),
    np.asarray([0.91, 0.5, 0.3], np.float32),
    np.asarray([0, 1, 7], np.int64),  # 7 has no name: drawn as its number
)


@pytest.mark.parametrize(
    ("read_only", "detections", "timestamp_text"),
    [
        (False, BOXES, None),
        (True, BOXES, None),
        (True, BOXES, "2026-11-22 18:00:00.123"),
        (True, Detections.empty(), "t=0.000s"),
    ],
)
def test_draws_on_a_copy(read_only: bool, detections: Detections, timestamp_text: str | None) -> None:
    image = frame(read_only)
    before = image.copy()
    out = draw_detections(image, detections, NAMES, timestamp_text=timestamp_text)
    assert np.array_equal(image, before)
    assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.writeable
    assert not np.shares_memory(out, image)
    for x1, y1, x2, y2 in detections.xyxy.astype(int):
        # the box outline is drawn in its class colour
        assert not np.array_equal(out[y1:y2 + 1, x1:x2 + 1], image[y1:y2 + 1, x1:x2 + 1])
    top_left = (slice(0, 12), slice(0, 60))
    assert np.array_equal(out[top_left], image[top_left]) != bool(timestamp_text or len(detections))


def test_empty_detections_without_timestamp_give_an_equal_copy() -> None:
    image = frame(read_only=True)
    assert np.array_equal(draw_detections(image, Detections.empty(), NAMES), image)


@pytest.mark.parametrize(
    ("colors", "class_id", "expected_bgr"),
    [
        (None, 0, PALETTE_BGR[0]),
        (None, len(PALETTE_BGR) + 2, PALETTE_BGR[2]),  # cycles
        ([(0, 0, 255), (0, 255, 0)], 1, (0, 255, 0)),
        ([(0, 0, 255), (0, 255, 0)], 2, (0, 0, 255)),
    ],
)
def test_each_class_has_a_fixed_colour(colors, class_id: int, expected_bgr: tuple[int, int, int]) -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    box = Detections(np.asarray([[20, 50, 80, 90]], np.float32), np.asarray([0.8], np.float32), np.asarray([class_id]))
    out = draw_detections(image, box, NAMES, colors=colors)
    assert tuple(out[70, 20]) == expected_bgr  # a pixel on the left edge of the box
    assert class_color(class_id, colors or PALETTE_BGR) == expected_bgr
    assert len(set(PALETTE_BGR)) == len(PALETTE_BGR)


@pytest.mark.parametrize(
    "image",
    [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 3), np.float32)],
    ids=["gray", "bgra", "float"],
)
def test_rejects_what_is_not_a_bgr_frame(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        draw_detections(image, Detections.empty(), NAMES)


@pytest.mark.parametrize("box", [[0, 0, 60, 40], [5, 2, 200, 100], [100, 0, 300, 30]])
def test_box_tags_never_cover_the_timestamp_or_the_status(box: list[float]) -> None:
    """A box at the top edge: its tag goes below the band of the stream id / frame / time line and the AI marker,
    which read exactly as on a frame without detections."""
    image = np.full((240, 320, 3), 90, np.uint8)
    text, status = "eus-1 #1234  pts 41.133 s  2026-11-22 18:00:00.123 UTC", ("AI active", (60, 160, 40))
    detections = Detections(np.array([box], np.float32), np.array([0.9], np.float32), np.array([0]))
    drawn = draw_detections(image, detections, NAMES, timestamp_text=text, status=status)
    bare = draw_detections(image, Detections.empty(), NAMES, timestamp_text=text, status=status)
    band = bare != image  # where the line and the marker are
    rows = np.flatnonzero(band.any(axis=(1, 2)))
    assert rows.size and np.array_equal(drawn[band], bare[band])
    tag_color = np.array(class_color(0), np.uint8)
    assert (drawn[rows[-1] + 1 :] == tag_color).all(axis=2).any()  # the tag is drawn, below the band


def test_confirmed_tracks_are_solid_and_named_tentative_ones_dashed():
    """A confirmed track's box: a solid, thicker outline (every pixel of its top edge drawn); a tentative one dashed
    (gaps along its edge); both in the class colour."""
    frame = np.zeros((360, 640, 3), np.uint8)
    found = Detections([[100, 150, 300, 300], [350, 150, 550, 300]], [0.9, 0.8], [0, 0])
    drawn = draw_detections(frame, found.with_tracks(np.array([7, 8]), np.array([True, False])), ("lesion",))
    color = np.array(PALETTE_BGR[0])
    bottom_confirmed = (drawn[300, 100:301] == color).all(axis=1)
    bottom_tentative = (drawn[300, 350:551] == color).all(axis=1)
    assert bottom_confirmed.all()  # solid
    assert 0.3 < bottom_tentative.mean() < 0.7  # dashed: about half drawn
    assert (drawn[301, 100:301] == color).all()  # twice as thick as an untracked box (1 px at 360p)
    untracked = draw_detections(frame, found[:1], ("lesion",))
    assert not (untracked[301, 100:301] == color).all()
