"""trainer.evaluate with fake detectors: the report, its files, and load_detector's checks."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from rich.console import Console

from streamd.errors import BundleError
from streamd.model import write_bundle
from trainer.config import Experiment
from trainer.datasets.records import DatasetSplit, ImageRecord
from streamd.backends.base import FunctionBackend
from trainer.detect import Detector
from trainer.evaluate import PR_CURVES_FILE, REPORT_FILE, evaluate, load_detector, print_report

CLASSES = ("red", "green")
COLORS_BGR = ((0, 0, 255), (0, 255, 0))  # class i is drawn as a solid rectangle of COLORS_BGR[i]
IMAGE_HW = (96, 128)
INPUT_HW = (128, 128)  # letterbox scale 1: the fake detector sees the image's own pixels
MAX_BOXES = 8


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> DatasetSplit:
    """Three images with coloured rectangles and one background image, written as PNG."""
    folder = tmp_path_factory.mktemp("images")
    layouts = {
        "a": [(10, 10, 40, 50, 0), (60, 20, 120, 90, 1)],
        "b": [(0, 0, 30, 30, 1), (70, 40, 100, 60, 0), (20, 60, 50, 90, 0)],
        "c": [(30, 30, 90, 80, 0)],
        "background": [],
    }
    records = []
    for image_id, boxes in layouts.items():
        image = np.full((*IMAGE_HW, 3), 128, np.uint8)
        for x1, y1, x2, y2, c in boxes:
            image[y1:y2, x1:x2] = COLORS_BGR[c]
        path = folder / f"{image_id}.png"
        cv2.imwrite(str(path), image)
        records.append(ImageRecord(
            image_id, path, IMAGE_HW[1], IMAGE_HW[0],
            np.asarray([b[:4] for b in boxes], np.float32).reshape(-1, 4), [b[4] for b in boxes], [False] * len(boxes),
            background=not boxes,
        ))
    return DatasetSplit("synthetic", "test", CLASSES, tuple(records))


def blob_run(ghost_score: float | None = None):
    """A fake model: finds each class's solid rectangles in the letterboxed batch.

    Returns float32 [N, MAX_BOXES, 5 + C] rows (cx, cy, w, h, objectness, class scores) like the
    bundle's ONNX output; unused rows are zeros (score 0, dropped by any threshold above 0).
    With ghost_score, every image also gets a box of class 0 where nothing is, at that score.
    """

    def run(batch: np.ndarray) -> np.ndarray:
        output = np.zeros((len(batch), MAX_BOXES, 5 + len(CLASSES)), np.float32)
        for n, chw in enumerate(batch):
            image = chw.transpose(1, 2, 0)
            rows = []
            for c, color in enumerate(COLORS_BGR):
                mask = np.all(image == color, axis=2).astype(np.uint8)
                count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
                for x, y, w, h, _area in stats[1:count]:
                    rows.append((x + w / 2, y + h / 2, w, h, 0.9, c))
            if ghost_score is not None:
                # in the top-right corner, where no image has a box: never a hit (inside the image, since
                # postprocess drops a box that clipping to the image leaves empty)
                rows.append((115, 10, 10, 10, ghost_score, 0))
            for i, (cx, cy, w, h, objectness, c) in enumerate(rows):
                output[n, i, :5] = (cx, cy, w, h, objectness)
                output[n, i, 5 + c] = 1.0
        return output

    return run


def zeros_run(batch: np.ndarray) -> np.ndarray:
    return np.zeros((len(batch), MAX_BOXES, 5 + len(CLASSES)), np.float32)


@pytest.mark.parametrize(
    ("run", "class_ap", "num_detections"),
    [
        (blob_run(), [1.0, 1.0], [4, 2]),
        (zeros_run, [0.0, 0.0], [0, 0]),
        # A false positive of class 0 in every image, scored above every hit: the four ghosts rank
        # first, so class 0 reaches full recall at precision 4 / 8; class 1 is untouched.
        (blob_run(ghost_score=0.95), [0.5, 1.0], [8, 2]),
    ],
    ids=["perfect", "blind", "ghosts"],
)
def test_report_and_its_files(tmp_path: Path, split: DatasetSplit, run, class_ap: list[float], num_detections: list[int]) -> None:
    detector = Detector(FunctionBackend(run, INPUT_HW), INPUT_HW, CLASSES, name="fake", sha256="ab" * 32)
    report = evaluate(detector, split, batch_size=3, out_dir=tmp_path / "eval")
    for row, ap, count in zip(report.per_class, class_ap, num_detections):
        # exact boxes: the same AP at every IoU threshold, by every integration
        assert (row.ap50, row.ap50_07, row.ap50_95, row.coco_ap) == pytest.approx((ap,) * 4), row.name
        assert row.num_detections == count, row.name
    mean_ap = sum(class_ap) / len(class_ap)
    for key in ("voc07_map50", "voc_map50", "voc_map50_95", "coco_ap", "coco_ap50", "coco_ap75"):
        assert getattr(report, key) == pytest.approx(mean_ap), key
    data = json.loads((tmp_path / "eval" / REPORT_FILE).read_text())
    assert data["model_name"] == "fake" and data["model_sha256"] == "ab" * 32
    assert (data["dataset"], data["split"], data["num_images"], data["num_background"]) == ("synthetic", "test", 4, 1)
    assert [row["name"] for row in data["per_class"]] == list(CLASSES)
    assert [row["num_gt"] for row in data["per_class"]] == [4, 2]
    assert [row["ap50"] for row in data["per_class"]] == pytest.approx(class_ap)
    assert data["voc_map50"] == pytest.approx(mean_ap) and data["coco_ap"] == pytest.approx(mean_ap)
    png = cv2.imread(str(tmp_path / "eval" / PR_CURVES_FILE))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 100
    console = Console(file=io.StringIO(), width=120)
    print_report(report, console)
    printed = console.file.getvalue()
    assert all(name in printed for name in CLASSES) and "COCO AP50" in printed


def test_report_json_writes_nan_as_null(tmp_path: Path, split: DatasetSplit) -> None:
    """A class without ground truth has no AP: null in the JSON, not NaN (which is not JSON)."""
    three = DatasetSplit(split.dataset, split.split, (*CLASSES, "absent"), split.records)
    detector = Detector(FunctionBackend(zeros_run, INPUT_HW), INPUT_HW, three.class_names)
    evaluate(detector, three, out_dir=tmp_path)
    data = json.loads((tmp_path / REPORT_FILE).read_text(), parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert data["per_class"][2] | {"num_gt": 0} == data["per_class"][2]
    assert data["per_class"][2]["ap50"] is None and data["per_class"][2]["coco_ap"] is None


def test_unreadable_image_is_an_error(tmp_path: Path, split: DatasetSplit) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = DatasetSplit("synthetic", "test", CLASSES, (*split.records, ImageRecord("broken", broken, 10, 10, [], [], [])))
    with pytest.raises(OSError, match="broken.png: cannot be read"):
        evaluate(Detector(FunctionBackend(zeros_run, INPUT_HW), INPUT_HW, CLASSES), bad)


def experiment(tmp_path: Path, classes: tuple[str, ...] = CLASSES) -> Experiment:
    return Experiment.model_validate(
        {"name": "fake", "classes": list(classes), "dataset": {"name": "synthetic", "format": "voc", "root": str(tmp_path)},
         "train": {"device": "cpu"}}
    )


def zero_model_onnx(input_hw: tuple[int, int], num_classes: int) -> bytes:
    """An ONNX model with the bundle's I/O ([N, 3, H, W] -> [N, A, 5 + C]) that detects nothing."""
    import onnx
    from onnx import TensorProto, helper

    columns = 5 + num_classes
    anchors = 3 * input_hw[0] * input_hw[1] // columns
    # images * 0, flattened per image, cut to anchors * columns values, reshaped to [N, anchors, columns].
    graph = helper.make_graph(
        [helper.make_node("Mul", ["images", "zero"], ["scaled"]),
         helper.make_node("Reshape", ["scaled", "flat_shape"], ["flat"]),
         helper.make_node("Slice", ["flat", "start", "end", "axis"], ["cut"]),
         helper.make_node("Reshape", ["cut", "shape"], ["output"])],
        "zeros",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, *input_hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", anchors, columns])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("flat_shape", TensorProto.INT64, [2], [0, -1]),
         helper.make_tensor("start", TensorProto.INT64, [1], [0]),
         helper.make_tensor("end", TensorProto.INT64, [1], [anchors * columns]),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
         helper.make_tensor("shape", TensorProto.INT64, [3], [-1, anchors, columns])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_bundle(path: Path, classes: tuple[str, ...]) -> Path:
    write_bundle(path, zero_model_onnx((64, 64), len(classes)), {
        "name": "zeros", "architecture": "yolox_nano", "class_names": list(classes), "input_hw": [64, 64],
        "onnx": {"opset": 17},
        "provenance": {"dataset": "synthetic", "dataset_hash": "0", "epochs": 0, "trainer_version": "test",
                       "created_at": "2026-01-01T00:00:00Z"},
    })
    return path


def test_bundle_detector_runs_on_onnxruntime(tmp_path: Path, split: DatasetSplit) -> None:
    detector = load_detector(make_bundle(tmp_path / "zeros.bundle", CLASSES), experiment(tmp_path))
    assert detector.name == "zeros" and len(detector.sha256) == 64
    report = evaluate(detector, split)
    assert report.model_sha256 == detector.sha256 and report.voc_map50 == 0.0


def write_checkpoint(path: Path, weights: dict, trained: dict) -> Path:
    """A checkpoint as `trainer train` writes it, with these weights (as EMA and raw) and experiment."""
    from trainer.checkpoint import Checkpoint, RngState, save_checkpoint

    parameter = torch.nn.Parameter(torch.zeros(1))
    save_checkpoint(path, Checkpoint(
        model=weights, raw_model=weights, optimizer=torch.optim.SGD([parameter], lr=0.01).state_dict(),
        scaler=torch.amp.GradScaler("cuda", enabled=False).state_dict(), ema_updates=0, epoch=0, iteration=0,
        best_val_map50=-1.0, best_epoch=0, val_metrics={}, experiment=trained, dataset_hash="", trainer_version="test",
        rng=RngState.capture(),
    ))
    return path


def test_checkpoint_detector(tmp_path: Path, split: DatasetSplit) -> None:
    from trainer.yolox_adapter import build_model

    trained = experiment(tmp_path).model_dump(mode="json") | {"model": {"architecture": "yolox_nano", "input_hw": [64, 64]}}
    path = write_checkpoint(tmp_path / "best.pth", build_model("yolox_nano", len(CLASSES)).state_dict(), trained)
    detector = load_detector(path, experiment(tmp_path))
    assert (detector.name, detector.input_hw, detector.class_names) == ("fake", (64, 64), CLASSES)
    assert len(detector.sha256) == 64
    (detections,) = detector.detect([cv2.imread(str(split.records[0].path))], 0.001, 0.65)
    assert detections.xyxy.shape[1] == 4


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda d: d / "missing.bundle", FileNotFoundError, "missing.bundle: no such"),
        (lambda d: write_file(d / "model.onnx", b"x"), ValueError, "model.onnx: not a model bundle folder"),
        (lambda d: write_file(d / "junk.pth", b"not a checkpoint"), ValueError, "junk.pth: not a readable torch checkpoint"),
        (lambda d: d, BundleError, "bundle.json: missing"),
        (lambda d: make_bundle(d / "other.bundle", ("cat", "dog")), ValueError, r"classes \['cat', 'dog'\] differ"),
    ],
    ids=["missing", "not-a-bundle", "junk-checkpoint", "folder-without-bundle", "other-classes"],
)
def test_load_detector_errors(tmp_path: Path, make, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        load_detector(make(tmp_path), experiment(tmp_path))


def megvii_checkpoint(path: Path) -> Path:
    torch.save({"model": {}}, path)  # a Megvii checkpoint has a "model" too
    return path


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (megvii_checkpoint, r"not a checkpoint written by `trainer train` \(missing raw_model, optimizer"),
        (lambda path: write_checkpoint(path, {"w": torch.zeros(1)}, {"name": "x", "classes": ["a"], "model": {
            "architecture": "yolox_nano", "input_hw": [64, 64]}}), "weights do not fit a yolox_nano with 1 classes"),
    ],
    ids=["megvii", "wrong-weights"],
)
def test_load_detector_rejects_foreign_checkpoints(tmp_path: Path, write, match: str) -> None:
    path = write(tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match=match):
        load_detector(path, experiment(tmp_path))
