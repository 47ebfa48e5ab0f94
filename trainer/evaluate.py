"""Evaluate a detector on a dataset split: VOC and COCO metrics, a report, PR curves.

`evaluate(detector, split) -> EvalReport` runs the detector over every image
of the split (streamd's own letterbox and postprocess, see trainer.detect),
then scores the detections two ways:

- VOC (trainer.metrics): AP@0.5 with the 2007 11-point and the 2010+ area
  integration, and AP averaged over IoU 0.5:0.95. Difficult boxes are
  neither hits nor misses.
- COCO (pycocotools' COCOeval on in-memory COCO dicts): AP 0.5:0.95, AP50,
  AP75 and AP by object size. Difficult boxes become `iscrowd=1`, the only
  ignore flag COCOeval honours (it overwrites an `ignore` key with
  `iscrowd`); a detection on one is ignored, with COCO's crowd overlap
  (intersection over the detection's area) instead of IoU.

Background images are part of both: every detection on them is a false
positive. With an output folder it writes `report.json` and `pr_curves.png`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from streamd.model import sha256_file
from streamd.model.detections import Detections
from streamd.model.preprocess import letterbox_hw
from trainer.checkpoint import read_checkpoint
from trainer.config import Experiment
from trainer.datasets.images import read_image
from trainer.datasets.records import DatasetSplit
from trainer.detect import Detector, bundle_detector, torch_detector
from trainer.device import pick_device
from trainer.metrics import PrCurve, voc_metrics

REPORT_FILE = "report.json"
PR_CURVES_FILE = "pr_curves.png"
# COCOeval.stats indices of the summary numbers we keep (area "all", 100 detections per image).
COCO_STATS = {"coco_ap": 0, "coco_ap50": 1, "coco_ap75": 2, "coco_ap_small": 3, "coco_ap_medium": 4, "coco_ap_large": 5}
# Detection thresholds for AP: a low conf_threshold keeps the low-score tail that AP integrates over (YOLOX
# evaluates at 0.001 too); the NMS IoU is YOLOX's evaluation one.
AP_CONF_THRESHOLD = 0.001
AP_IOU_THRESHOLD = 0.65
# What validation during training measures (best.pth is picked by voc_map50), in metrics.csv's column order.
VAL_KEYS = ("voc_map50", "voc07_map50", "voc_map50_95")


@dataclass(frozen=True, slots=True)
class ClassRow:
    """The metrics of one class; NaN where the split has no ground truth of the class."""

    name: str
    num_gt: int  # boxes not marked difficult
    num_detections: int  # at the evaluation's conf_threshold
    ap50: float  # VOC area AP at IoU 0.5
    ap50_07: float  # VOC 2007 11-point AP at IoU 0.5
    ap50_95: float  # VOC area AP averaged over IoU 0.5:0.95
    coco_ap: float  # COCO AP 0.5:0.95


@dataclass(frozen=True, slots=True)
class EvalReport:
    """What `evaluate` measured, written as report.json."""

    model_name: str
    model_sha256: str
    dataset: str
    split: str
    num_images: int
    num_background: int
    conf_threshold: float
    iou_threshold: float
    voc07_map50: float
    voc_map50: float
    voc_map50_95: float
    coco_ap: float
    coco_ap50: float
    coco_ap75: float
    coco_ap_small: float
    coco_ap_medium: float
    coco_ap_large: float
    per_class: tuple[ClassRow, ...]
    seconds: float
    num_skipped: int = 0  # images the split names that could not be read: the report covers the rest

    def to_json(self) -> dict:
        """The report as JSON-ready values; NaN (no ground truth) becomes null."""
        return _json_safe(dataclasses.asdict(self))


def _json_safe(value):
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def coco_ground_truth(split: DatasetSplit) -> dict:
    """The split as a COCO dataset dict: image i has id i + 1, class c has category id c + 1.

    Boxes are xywh in image pixels, area = w * h; difficult boxes get iscrowd=1.
    """
    images, annotations = [], []
    for i, record in enumerate(split.records):
        images.append({"id": i + 1, "file_name": record.path.name, "width": record.width, "height": record.height})
        for box, class_id, difficult in zip(record.xyxy.tolist(), record.class_id.tolist(), record.difficult.tolist()):
            width, height = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1,  # COCOeval treats id 0 as "unmatched"
                "image_id": i + 1,
                "category_id": class_id + 1,
                "bbox": [box[0], box[1], width, height],
                "area": width * height,
                "iscrowd": int(difficult),
            })
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(split.class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(predictions: list[Detections]) -> list[dict]:
    """Detections in COCO's result format (as `COCO.loadRes` completes it), image i -> id i + 1."""
    results = []
    for i, det in enumerate(predictions):
        for box, score, class_id in zip(det.xyxy.tolist(), det.confidence.tolist(), det.class_id.tolist()):
            width, height = box[2] - box[0], box[3] - box[1]
            results.append({
                "id": len(results) + 1,
                "image_id": i + 1,
                "category_id": class_id + 1,
                "bbox": [box[0], box[1], width, height],
                "score": score,
                "area": width * height,
                "iscrowd": 0,
            })
    return results


def _coco_api(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def coco_metrics(split: DatasetSplit, predictions: list[Detections]) -> dict:
    """COCO box AP of the predictions (one Detections per image of the split, in order).

    Returns coco_ap (0.5:0.95), coco_ap50, coco_ap75, coco_ap_small/_medium/_large
    and per_class {name: AP 0.5:0.95}; NaN where COCOeval has no ground truth
    to score (its -1).
    """
    if len(predictions) != len(split):
        raise ValueError(f"{len(predictions)} predictions for {len(split)} images of split {split.split!r}")
    ground_truth = coco_ground_truth(split)
    results = {"images": ground_truth["images"], "categories": ground_truth["categories"],
               "annotations": coco_results(predictions)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and the summary
        coco_eval = COCOeval(_coco_api(ground_truth), _coco_api(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {key: _nan_if_missing(coco_eval.stats[index]) for key, index in COCO_STATS.items()}
    # precision: [IoU thresholds, recall points, categories, area ranges, max detections]
    precision = coco_eval.eval["precision"]
    metrics["per_class"] = {}
    for k, name in enumerate(split.class_names):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        metrics["per_class"][name] = float(values.mean()) if values.size else float("nan")
    return metrics


def _nan_if_missing(value: float) -> float:
    return float("nan") if value < 0 else float(value)


def detect_split(
    detector: Detector, split: DatasetSplit, conf_threshold: float, iou_threshold: float, batch_size: int = 8
) -> list[Detections]:
    """Detections (source pixels) for every image of the split, in order, with a progress bar."""
    predictions: list[Detections] = []
    with tqdm(total=len(split), desc=f"eval {split.dataset}/{split.split}", unit="img", dynamic_ncols=True) as bar:
        for start in range(0, len(split), batch_size):
            images = []
            for record in split.records[start:start + batch_size]:
                try:
                    images.append(read_image(record.path, (record.width, record.height)))
                    letterbox_hw((record.height, record.width), detector.input_hw)
                except (OSError, ValueError) as exc:
                    message = str(exc).removeprefix(f"{record.path}: ")
                    raise OSError(f"{record.path}: {message} (split {split.split!r} of {split.dataset})") from exc
            predictions.extend(detector.detect(images, conf_threshold, iou_threshold))
            bar.update(len(images))
    return predictions


def validation_metrics(
    model: torch.nn.Module, split: DatasetSplit, input_hw: tuple[int, int], device: torch.device
) -> dict[str, float]:
    """VAL_KEYS of a torch YOLOX model on a split, at evaluate's low thresholds (VOC only: no COCOeval per epoch).

    The model is put in eval mode (trainer.yolox_adapter.inference_model).
    """
    detector = torch_detector(model, input_hw, split.class_names, str(device))
    metrics = voc_metrics(split, detect_split(detector, split, AP_CONF_THRESHOLD, AP_IOU_THRESHOLD))
    return {key: metrics[key] for key in VAL_KEYS}


def evaluate(
    detector: Detector,
    split: DatasetSplit,
    conf_threshold: float = AP_CONF_THRESHOLD,
    iou_threshold: float = AP_IOU_THRESHOLD,
    batch_size: int = 8,
    out_dir: Path | None = None,
) -> EvalReport:
    """Score `detector` on `split`; with `out_dir`, also write report.json and pr_curves.png there.

    iou_threshold is the NMS IoU; the defaults are AP's (AP_CONF_THRESHOLD, AP_IOU_THRESHOLD).
    """
    started = time.time()
    predictions = detect_split(detector, split, conf_threshold, iou_threshold, batch_size)
    voc = voc_metrics(split, predictions)
    coco = coco_metrics(split, predictions)
    rows = tuple(
        ClassRow(
            name=name,
            num_gt=voc["per_class"][name]["num_gt"],
            num_detections=int(sum((det.class_id == c).sum() for det in predictions)),
            ap50=voc["per_class"][name]["ap50"],
            ap50_07=voc["per_class"][name]["ap50_07"],
            ap50_95=voc["per_class"][name]["ap50_95"],
            coco_ap=coco["per_class"][name],
        )
        for c, name in enumerate(split.class_names)
    )
    report = EvalReport(
        model_name=detector.name,
        model_sha256=detector.sha256,
        dataset=split.dataset,
        split=split.split,
        num_images=len(split),
        num_background=split.num_background,
        conf_threshold=conf_threshold,
        iou_threshold=iou_threshold,
        voc07_map50=voc["voc07_map50"],
        voc_map50=voc["voc_map50"],
        voc_map50_95=voc["voc_map50_95"],
        **{key: coco[key] for key in COCO_STATS},
        per_class=rows,
        seconds=round(time.time() - started, 2),
        num_skipped=split.num_skipped,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        title = f"{report.model_name} on {report.dataset}/{report.split}"
        plot_pr_curves(voc["curves"], rows, out_dir / PR_CURVES_FILE, title)
    return report


def plot_pr_curves(curves: list[PrCurve], rows: tuple[ClassRow, ...], png_path: Path, title: str) -> None:
    """One precision-recall curve per class at IoU 0.5 (the envelope VOC AP integrates), AP in the legend."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    figure = Figure(figsize=(7, 6))
    axes = figure.add_subplot()
    for curve, row in zip(curves, rows):
        if curve.num_gt == 0:
            continue
        envelope = np.maximum.accumulate(curve.precision[::-1])[::-1]
        # Interpolated precision on (r[i-1], r[i]] is envelope[i]: steps-pre, starting from recall 0.
        start = envelope[0] if len(envelope) else 0.0  # no detection at all: a point at (0, 0)
        axes.plot(np.concatenate(([0.0], curve.recall)), np.concatenate(([start], envelope)),
                  drawstyle="steps-pre", label=f"{row.name} AP50 {row.ap50:.3f} ({row.num_gt} boxes)")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower left")
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def print_report(report: EvalReport, console: Console | None = None) -> None:
    """A table of per-class AP and the summary numbers, on the terminal."""
    console = console or Console()
    per_class = Table(title=f"{report.model_name} on {report.dataset}/{report.split}")
    for column in ("class", "boxes", "detections", "AP50", "AP50 (VOC07)", "AP50:95", "COCO AP"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for row in report.per_class:
        per_class.add_row(row.name, str(row.num_gt), str(row.num_detections), _fmt(row.ap50), _fmt(row.ap50_07),
                          _fmt(row.ap50_95), _fmt(row.coco_ap))
    console.print(per_class)
    summary = Table(title="summary", show_header=False)
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    for label, value in (
        ("VOC mAP50 (area)", _fmt(report.voc_map50)),
        ("VOC mAP50 (VOC07 11-point)", _fmt(report.voc07_map50)),
        ("VOC mAP50:95", _fmt(report.voc_map50_95)),
        ("COCO AP", _fmt(report.coco_ap)),
        ("COCO AP50", _fmt(report.coco_ap50)),
        ("COCO AP75", _fmt(report.coco_ap75)),
        ("COCO AP small / medium / large",
         f"{_fmt(report.coco_ap_small)} / {_fmt(report.coco_ap_medium)} / {_fmt(report.coco_ap_large)}"),
        ("images (background)", f"{report.num_images} ({report.num_background})"
                                 + (f", {report.num_skipped} skipped: a subset" if report.num_skipped else "")),
        ("thresholds conf / NMS IoU", f"{report.conf_threshold} / {report.iou_threshold}"),
        ("model sha256", report.model_sha256[:16] or "-"),
    ):
        summary.add_row(label, value)
    console.print(summary)


def load_detector(path: str | Path, exp: Experiment) -> Detector:
    """The detector to evaluate: a bundle folder on ONNX Runtime (what streamd runs), or a train checkpoint.

    A `.pth` checkpoint from trainer.train holds the EMA weights under "model"
    and its experiment; it runs in torch on exp.train.device. Raises
    FileNotFoundError for a missing path, ValueError for anything that is not
    a bundle or such a checkpoint or whose classes differ from exp.classes,
    and streamd.errors.BundleError for a malformed bundle.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model bundle folder or checkpoint")
    if path.is_dir():
        detector, _ = bundle_detector(path)
    elif path.suffix == ".pth":
        detector = _checkpoint_detector(path, exp)
    else:
        raise ValueError(f"{path}: not a model bundle folder (NAME.bundle/) nor a .pth checkpoint from `trainer train`")
    if tuple(detector.class_names) != tuple(exp.classes):
        raise ValueError(
            f"{path}: the model's classes {list(detector.class_names)} differ from the experiment's {list(exp.classes)}"
        )
    return detector


def _checkpoint_detector(path: Path, exp: Experiment) -> Detector:
    checkpoint = read_checkpoint(path)
    model = checkpoint.load_model(path)
    trained = checkpoint.experiment
    input_hw, classes = tuple(trained["model"]["input_hw"]), tuple(trained["classes"])
    detector = torch_detector(model, input_hw, classes, str(pick_device(exp.train.device)))
    return dataclasses.replace(detector, name=trained.get("name", path.stem), sha256=sha256_file(path))
