"""streamd.model.compare: greedy same-class matching, the bar, NMS flips and the threshold edge, row by row."""

from __future__ import annotations

import numpy as np
import pytest

from streamd.model.compare import BARS, Bar, Comparison, Mismatch, compare
from streamd.model.detections import Detections

BAR = Bar(min_iou=0.98, max_score_diff=0.02)


def dets(*rows: tuple[float, float, float, float, float, int]) -> Detections:
    """Detections from (x1, y1, x2, y2, score, class) rows."""
    array = np.asarray(rows, np.float64).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5])


CELL = (10, 10, 110, 110, 0.80, 0)
SHIFTED = (15, 15, 115, 115, 0.80, 0)  # IoU 0.82 with CELL: another candidate of the same cell
FAR = (300, 300, 400, 400, 0.80, 0)


@pytest.mark.parametrize(
    "reference, other, matched, flips, near, kinds",
    [
        ([CELL], [CELL], 1, 0, 0, []),
        ([CELL], [(10, 10, 110, 110.5, 0.81, 0)], 1, 0, 0, []),
        ([CELL], [(10, 10, 110, 110, 0.75, 0)], 0, 0, 0, ["score"]),
        ([CELL], [SHIFTED], 0, 1, 0, []),  # NMS kept the other candidate, close score: a flip
        ([CELL], [(15, 15, 115, 115, 0.70, 0)], 0, 0, 0, ["iou"]),  # the same overlap, a score too far: not a flip
        ([CELL], [(60, 60, 160, 160, 0.80, 0)], 0, 0, 0, ["iou"]),  # IoU 0.14: not one object
        ([CELL], [], 0, 0, 0, ["missing"]),
        ([], [CELL], 0, 0, 0, ["extra"]),
        ([CELL], [(*CELL[:5], 1)], 0, 0, 0, ["missing", "extra"]),  # another class never matches
        ([CELL, FAR], [FAR, CELL], 2, 0, 0, []),  # order does not matter
        # The reference kept CELL and SHIFTED2 (IoU < NMS threshold); the other kept SHIFTED, which suppressed
        # both: SHIFTED flips with one, the other is unpartnered but overlaps SHIFTED: a flip too.
        ([CELL, (20, 20, 120, 120, 0.79, 0)], [SHIFTED], 0, 2, 0, []),
        ([CELL, (200, 200, 240, 240, 0.31, 0)], [CELL], 1, 0, 1, []),  # 0.31 < conf 0.3 + 0.02: may fall under
        ([CELL, (200, 200, 240, 240, 0.40, 0)], [CELL], 1, 0, 0, ["missing"]),
    ],
)
def test_compare_one_frame(reference, other, matched, flips, near, kinds):
    result = compare([dets(*reference)], [dets(*other)], BAR, conf_threshold=0.3)
    assert (result.matched, result.flips, result.near_threshold) == (matched, flips, near)
    assert sorted(m.kind for m in result.mismatches) == sorted(kinds)
    assert result.ok == (not kinds) and result.frames == 1


def test_mismatches_name_the_frame_class_box_and_best_iou():
    result = compare([dets(CELL), dets(CELL)], [dets(CELL), dets()], BAR)
    assert result == Comparison(2, 1, 0, (Mismatch(1, "missing", "class 0 [10.0, 10.0, 110.0, 110.0] score 0.800 only in the reference: best IoU none"),))
    assert result.summary() == ("2 frames: 1 matched, 0 NMS flips, 0 at the threshold, 1 mismatches; first: frame 1 missing: "
                                "class 0 [10.0, 10.0, 110.0, 110.0] score 0.800 only in the reference: best IoU none")  # fmt: skip


def test_frame_counts_must_agree():
    with pytest.raises(ValueError, match="2 reference frames but 1 other"):
        compare([dets(), dets()], [dets()], BAR)


def test_every_precision_has_a_bar_no_tighter_than_fp32():
    assert set(BARS) == {"fp32", "fp16", "bf16", "int8"}
    for bar in BARS.values():
        assert bar.min_iou <= BARS["fp32"].min_iou and bar.max_score_diff >= BARS["fp32"].max_score_diff


@pytest.mark.parametrize("matched, flips, fraction", [(0, 0, 0.0), (99, 1, 0.01), (0, 3, 1.0)])
def test_flip_fraction_is_flips_per_pair(matched, flips, fraction):
    assert Comparison(1, matched, flips, ()).flip_fraction == pytest.approx(fraction)


def test_every_bar_bounds_flips_and_lower_precisions_no_tighter():
    order = ("fp32", "fp16", "bf16", "int8")
    assert all(0 < BARS[p].max_flip_fraction <= BARS[q].max_flip_fraction for p, q in zip(order, order[1:]))
