"""VOC AP (trainer.metrics) and COCO AP (trainer.evaluate.coco_metrics) on hand-made splits."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from streamd.model.detections import Detections
from trainer.datasets.records import DatasetSplit, ImageRecord
from trainer.evaluate import coco_metrics
from trainer.metrics import voc_metrics

CLASSES = ("cell", "platelet")


def record(image_id: str, boxes: list[tuple], width: int = 640, height: int = 480) -> ImageRecord:
    """An image with boxes given as (x1, y1, x2, y2, class_id[, difficult]); no boxes = background image."""
    return ImageRecord(
        image_id,
        Path(f"/nowhere/{image_id}.jpg"),  # metrics never read the image
        width,
        height,
        np.asarray([b[:4] for b in boxes], np.float32).reshape(-1, 4),
        [b[4] for b in boxes],
        [bool(b[5]) if len(b) > 5 else False for b in boxes],
        background=not boxes,
    )


def split_of(*records: ImageRecord) -> DatasetSplit:
    return DatasetSplit("synthetic", "test", CLASSES, tuple(records))


def detections(rows: list[tuple]) -> Detections:
    """Detections from (x1, y1, x2, y2, score, class_id) rows."""
    array = np.asarray(rows, np.float32).reshape(-1, 6)
    return Detections(array[:, :4], array[:, 4], array[:, 5].astype(np.int64))


# Ground truth: up to five 40x40 boxes of class 0 along one row; a false positive sits far from all of them.
GT_ROW = [(10 + 100 * i, 10, 50 + 100 * i, 50, 0) for i in range(5)]
FALSE_POSITIVE = (300, 300, 340, 340)


def scored(sequence: str) -> list[tuple]:
    """Detections for a sequence like "TFTFT" by descending score: T hits the next ground-truth box, F misses."""
    rows, hit = [], 0
    for rank, kind in enumerate(sequence):
        score = 0.9 - 0.1 * rank
        if kind == "T":
            rows.append((*GT_ROW[hit][:4], score, 0))
            hit += 1
        else:
            rows.append((*FALSE_POSITIVE, score, 0))
    return rows


@pytest.mark.parametrize(
    ("num_gt", "sequence", "ap_area", "ap_07"),
    [
        # 4 boxes, TFTFT: precision 1, 1/2, 2/3, 1/2, 3/5 at recall .25, .25, .5, .5, .75.
        # Area: envelope 1 on (0, .25], 2/3 on (.25, .5], 3/5 on (.5, .75], 0 after:
        #   .25 * (1 + 2/3 + 3/5) = 17/30.
        # 07: recall >= t for t = 0, .1, .2 -> 1; .3, .4, .5 -> 2/3; .6, .7 -> 3/5; .8, .9, 1 -> 0:
        #   (3 + 3 * 2/3 + 2 * 3/5) / 11 = 6.2 / 11.
        (4, "TFTFT", 17 / 30, 6.2 / 11),
        # 5 boxes, TTFT: precision 1, 1, 2/3, 3/4 at recall .2, .4, .4, .6.
        # Area: .2 * 1 + .2 * 1 + .2 * 3/4 = .55.
        # 07: t = 0 ... .4 -> 1; .5, .6 -> 3/4 (recall is exactly 3/5 = .6); .7 ... 1 -> 0: (5 + 1.5) / 11.
        (5, "TTFT", 0.55, 6.5 / 11),
        # Every box found first, then misses: precision falls only after full recall.
        (3, "TTTFF", 1.0, 1.0),
        # Only misses.
        (2, "FF", 0.0, 0.0),
    ],
)
def test_voc_ap_by_hand(num_gt: int, sequence: str, ap_area: float, ap_07: float) -> None:
    split = split_of(record("a", GT_ROW[:num_gt]))
    result = voc_metrics(split, [detections(scored(sequence))])
    assert result["per_class"]["cell"]["ap50"] == pytest.approx(ap_area)
    assert result["per_class"]["cell"]["ap50_07"] == pytest.approx(ap_07)
    assert result["per_class"]["cell"]["num_gt"] == num_gt
    assert np.isnan(result["per_class"]["platelet"]["ap50"])  # no ground truth: left out of the means
    assert result["voc_map50"] == pytest.approx(ap_area)


def perfect(split: DatasetSplit) -> list[Detections]:
    return [detections([(*box, 0.9, c) for box, c in zip(r.xyxy.tolist(), r.class_id.tolist())]) for r in split.records]


def nothing(split: DatasetSplit) -> list[Detections]:
    return [Detections.empty() for _ in split.records]


MIXED = split_of(
    record("a", [(10, 10, 60, 70, 0), (100, 100, 300, 260, 1), (400, 20, 600, 460, 0)]),
    record("b", [(5, 5, 20, 25, 1), (200, 200, 330, 330, 0)]),
    record("empty", []),
)


@pytest.mark.parametrize(("predict", "expected"), [(perfect, 1.0), (nothing, 0.0)])
def test_perfect_and_empty_detectors(predict, expected: float) -> None:
    predictions = predict(MIXED)
    voc = voc_metrics(MIXED, predictions)
    coco = coco_metrics(MIXED, predictions)
    for key in ("voc_map50", "voc07_map50", "voc_map50_95"):
        assert voc[key] == pytest.approx(expected), key
    for key in ("coco_ap", "coco_ap50", "coco_ap75"):
        assert coco[key] == pytest.approx(expected), key
    assert coco["per_class"] == pytest.approx(dict.fromkeys(CLASSES, expected))


def noisy_case(seed: int) -> tuple[DatasetSplit, list[Detections]]:
    """Random boxes of all sizes (some difficult), two background images, jittered hits and random misses."""
    rng = np.random.default_rng(seed)
    records, predictions = [], []
    for i in range(12):
        boxes = []
        for _ in range(0 if i in (3, 8) else int(rng.integers(1, 6))):
            x1, y1 = rng.uniform(0, 500), rng.uniform(0, 380)
            w, h = rng.uniform(4, 220), rng.uniform(4, 160)
            boxes.append((x1, y1, x1 + w, y1 + h, int(rng.integers(0, 2)), bool(rng.random() < 0.15)))
        rows = []
        for x1, y1, x2, y2, c, _ in boxes:
            if rng.random() < 0.8:
                jitter = rng.normal(0, 0.08, 4) * (x2 - x1)
                rows.append((x1 + jitter[0], y1 + jitter[1], x2 + jitter[2], y2 + jitter[3], rng.uniform(0.2, 1), c))
        for _ in range(int(rng.integers(0, 4))):
            x1, y1 = rng.uniform(0, 560), rng.uniform(0, 420)
            rows.append((x1, y1, x1 + rng.uniform(5, 80), y1 + rng.uniform(5, 60), rng.uniform(0, 1), int(rng.integers(0, 2))))
        records.append(record(f"img{i}", boxes))
        predictions.append(detections(rows))
    return split_of(*records), predictions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_metrics_equal_pycocotools_on_files(tmp_path: Path, seed: int) -> None:
    split, predictions = noisy_case(seed)
    images, annotations, results = [], [], []
    for i, (r, det) in enumerate(zip(split.records, predictions)):
        images.append({"id": i + 1, "file_name": r.path.name, "width": r.width, "height": r.height})
        for (x1, y1, x2, y2), c, difficult in zip(r.xyxy.tolist(), r.class_id.tolist(), r.difficult.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(difficult)})
        for (x1, y1, x2, y2), score, c in zip(det.xyxy.tolist(), det.confidence.tolist(), det.class_id.tolist()):
            results.append({"image_id": i + 1, "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": c + 1, "name": n} for c, n in enumerate(CLASSES)]}))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
        reference = COCOeval(gt, gt.loadRes(results), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    ours = coco_metrics(split, predictions)
    for index, key in enumerate(("coco_ap", "coco_ap50", "coco_ap75", "coco_ap_small", "coco_ap_medium", "coco_ap_large")):
        expected = float("nan") if reference.stats[index] == -1 else reference.stats[index]  # -1: no box that size
        assert ours[key] == pytest.approx(expected, abs=1e-12, nan_ok=True), key
    assert 0.05 < ours["coco_ap"] < 0.95  # a noisy case, not a trivial one
    for k, name in enumerate(CLASSES):
        precision = reference.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class"][name] == pytest.approx(precision[precision > -1].mean())


@pytest.mark.parametrize(
    ("difficult_detection", "expected"),
    [
        (None, 1.0),  # the difficult box is missed: not a miss
        (0.9, 1.0),  # found before the real hit: not a false positive
        (0.5, 1.0),  # found after it
    ],
)
def test_difficult_boxes_are_ignored(difficult_detection: float | None, expected: float) -> None:
    split = split_of(record("a", [(10, 10, 50, 50, 0), (200, 200, 260, 280, 0, True)]))
    rows = [(10, 10, 50, 50, 0.8, 0)]
    if difficult_detection is not None:
        rows.append((200, 200, 260, 280, difficult_detection, 0))
    voc = voc_metrics(split, [detections(rows)])
    coco = coco_metrics(split, [detections(rows)])
    assert voc["per_class"]["cell"]["num_gt"] == 1
    assert voc["per_class"]["cell"]["ap50"] == pytest.approx(expected)
    assert voc["per_class"]["cell"]["ap50_07"] == pytest.approx(expected)
    assert coco["coco_ap50"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("background_fp_score", "expected"),
    [
        # A false positive on the background image ranked above the only hit: precision 1/2 at recall 1.
        (0.9, 0.5),
        # Ranked below it: full recall was already reached at precision 1.
        (0.1, 1.0),
        (None, 1.0),
    ],
)
def test_false_positives_on_background_images_cost_precision(background_fp_score: float | None, expected: float) -> None:
    split = split_of(record("a", [(10, 10, 50, 50, 0)]), record("background", []))
    background = detections([(*FALSE_POSITIVE, background_fp_score, 0)] if background_fp_score else [])
    predictions = [detections([(10, 10, 50, 50, 0.5, 0)]), background]
    voc = voc_metrics(split, predictions)
    coco = coco_metrics(split, predictions)
    for value in (voc["voc_map50"], voc["voc07_map50"], coco["coco_ap50"], coco["coco_ap"]):
        assert value == pytest.approx(expected)


@pytest.mark.parametrize("metrics", [voc_metrics, coco_metrics])
def test_prediction_count_must_match_the_split(metrics) -> None:
    with pytest.raises(ValueError, match="1 predictions for 3 images"):
        metrics(MIXED, [Detections.empty()])
