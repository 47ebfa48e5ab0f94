"""VOC average precision, computed from the detections of a whole split.

Boxes are continuous pixel coordinates (no VOC "+1"), the same convention as
COCO, so VOC mAP@0.5 and COCO AP50 differ only in how they integrate the
precision-recall curve and in COCO's area ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamd.model.detections import Detections
from streamd.model.postprocess import iou_matrix
from trainer.datasets.records import DatasetSplit

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2).tolist())


@dataclass(frozen=True)
class PrCurve:
    """Precision and recall after each detection of one class, by descending score."""

    precision: np.ndarray
    recall: np.ndarray
    num_gt: int


def pr_curve(split: DatasetSplit, predictions: list[Detections], class_id: int, iou_threshold: float) -> PrCurve:
    """VOC matching for one class: greedy by score, difficult ground truth ignored."""
    gt_boxes, gt_difficult, used = [], [], []
    scores, image_index, boxes = [], [], []
    for i, (record, det) in enumerate(zip(split.records, predictions)):
        mask = record.class_id == class_id
        gt_boxes.append(record.xyxy[mask])
        gt_difficult.append(record.difficult[mask])
        used.append(np.zeros(int(mask.sum()), dtype=bool))
        keep = det.class_id == class_id
        scores.append(det.confidence[keep])
        boxes.append(det.xyxy[keep])
        image_index.append(np.full(int(keep.sum()), i))
    num_gt = int(sum((~d).sum() for d in gt_difficult))
    scores = np.concatenate(scores) if scores else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    image_index = np.concatenate(image_index)[order] if len(order) else np.zeros(0, int)
    boxes = np.concatenate(boxes)[order] if len(order) else np.zeros((0, 4))
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, (i, box) in enumerate(zip(image_index, boxes)):
        gt = gt_boxes[i]
        if len(gt) == 0:
            fp[d] = 1
            continue
        overlaps = iou_matrix(box[None], gt)[0]
        best = int(overlaps.argmax())
        if overlaps[best] < iou_threshold:
            fp[d] = 1
        elif gt_difficult[i][best]:
            continue  # neither a hit nor a miss, as in VOC
        elif not used[i][best]:
            tp[d] = 1
            used[i][best] = True
        else:
            fp[d] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / max(num_gt, 1)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return PrCurve(precision, recall, num_gt)


def average_precision(curve: PrCurve, use_07_metric: bool = False) -> float:
    """VOC AP: 11-point interpolation (VOC2007) or the area under the precision envelope (VOC2010+).

    NaN for a class with no ground truth.
    """
    if curve.num_gt == 0:
        return float("nan")
    if len(curve.recall) == 0:
        return 0.0
    if use_07_metric:
        # arange(11) / 10 makes each threshold the double nearest k/10, as a recall tp/num_gt is:
        # np.arange(0, 1.1, 0.1) has 0.30000000000000004, which a recall of exactly 3/10 misses.
        thresholds = np.arange(11) / 10
        points = [curve.precision[curve.recall >= t].max() if (curve.recall >= t).any() else 0.0 for t in thresholds]
        return float(np.mean(points))
    recall = np.concatenate(([0.0], curve.recall, [1.0]))
    precision = np.concatenate(([0.0], curve.precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def voc_metrics(split: DatasetSplit, predictions: list[Detections]) -> dict:
    """VOC mAP@0.5 (07 and area), mAP@0.5:0.95 (area), and per-class AP@0.5.

    Classes without ground truth in the split are left out of the means.
    """
    if len(predictions) != len(split):
        raise ValueError(f"{len(predictions)} predictions for {len(split)} images of split {split.split!r}")
    per_class = {}
    ap_by_threshold = []
    for threshold in IOU_THRESHOLDS:
        aps = [average_precision(pr_curve(split, predictions, c, threshold)) for c in range(len(split.class_names))]
        ap_by_threshold.append(aps)
    curves = [pr_curve(split, predictions, c, 0.5) for c in range(len(split.class_names))]
    ap07 = [average_precision(c, use_07_metric=True) for c in curves]
    for c, name in enumerate(split.class_names):
        per_class[name] = {
            "ap50": ap_by_threshold[0][c],
            "ap50_07": ap07[c],
            "ap50_95": float(np.nanmean([row[c] for row in ap_by_threshold])) if curves[c].num_gt else float("nan"),
            "num_gt": curves[c].num_gt,
        }
    return {
        "voc_map50": _nanmean(ap_by_threshold[0]),
        "voc07_map50": _nanmean(ap07),
        "voc_map50_95": _nanmean([_nanmean(row) for row in ap_by_threshold]),
        "per_class": per_class,
        "curves": curves,
    }


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
