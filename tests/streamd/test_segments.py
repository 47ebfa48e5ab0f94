"""streamd.segments: where a stream's recording and detection log start a new file, and their names."""

from __future__ import annotations

import pytest

from streamd.segments import Segmenter, segment_base_name
from tests.streamd import media


@pytest.mark.parametrize(
    ("segment_s", "frames", "expected"),
    [
        (1.0, [0.0, 0.5, 0.99, 1.0, 1.5, 2.0], [0, None, None, 1, None, 2]),  # the crossing frame opens a segment
        (1.0, [10.0, 10.9, 11.02, 11.5, 15.3, 15.4, 16.0], [0, None, 1, None, 2, None, 3]),  # gaps: one step each
        (0.04 * 3, [n * 0.04 for n in range(7)], [0, None, None, 1, None, None, 2]),  # float boundaries
        (600, [0.0, 1.0, 599.99], [0, None, None]),
    ],
)
def test_segmenter_boundaries(segment_s: float, frames: list[float], expected: list[int | None]) -> None:
    segmenter = Segmenter("eus-1", segment_s)
    starts = [segmenter.advance(f) for f in media.synthetic_frames(len(frames), pts_s=frames)]
    assert [s.index if s else None for s in starts] == expected
    for segment, pts in zip(starts, frames):
        if segment:
            assert segment.start_pts_s == pts
            assert segment.base_name == segment_base_name("eus-1", segment.started_at, segment.index)


def test_segmenter_starts_a_segment_when_the_size_changes() -> None:
    segmenter = Segmenter("eus-1", 600)
    small = list(media.synthetic_frames(2, size=(160, 120)))
    large = next(media.synthetic_frames(1, size=(320, 240), pts_s=[0.08]))
    assert [s.index if s else None for s in map(segmenter.advance, [*small, large])] == [0, None, 1]


def test_a_frame_after_an_outage_starts_a_new_segment() -> None:
    """Recordings never splice across an outage: the first frame after one (gap_s > 0) opens a segment."""
    import dataclasses

    segmenter = Segmenter("eus-1", 600)
    frames = list(media.synthetic_frames(3))
    back = dataclasses.replace(frames[2], gap_s=4.0)
    assert [s.index if s else None for s in map(segmenter.advance, [frames[0], frames[1], back])] == [0, None, 1]


def test_cut_starts_a_new_segment_at_the_next_frame() -> None:
    segmenter = Segmenter("eus-1", 600)
    frames = list(media.synthetic_frames(4))
    assert segmenter.advance(frames[0]).index == 0 and segmenter.advance(frames[1]) is None
    segmenter.cut()
    assert segmenter.advance(frames[2]).index == 1 and segmenter.advance(frames[3]) is None


def test_segment_name() -> None:
    assert segment_base_name("eus-1", 1_800_000_000.9, 7) == "eus-1_20270115T080000Z_0007"
