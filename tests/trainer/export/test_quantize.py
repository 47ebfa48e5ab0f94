"""trainer.export.quantize and `trainer quantize`: the shipped fp32 bundle to int8 on a few BCCD images, and bad inputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from streamd.backends.tensorrt_build import check_qdq
from streamd.errors import BackendError
from streamd.model import load_bundle
from streamd.model.bundle import sha256_file
from streamd.model.preprocess import letterbox
from synthetic import write_experiment
from trainer.cli import app
from trainer.detect import bundle_detector
from trainer.export.calibration import calibration_set
from trainer.export.quantize import decode_tail, input_stem, quantize_bundle

REPO = Path(__file__).parents[3]
SHIPPED = REPO / "models" / "bccd-nano.bundle"
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
CONF, IOU = 0.3, 0.45

runner = CliRunner()


def bccd_subset(bccd_root: Path, root: Path, train: int, test: int) -> Path:
    """A VOC folder with the first `train` images of BCCD's train list and the first `test` of its test list (as val too)."""
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split, source, count in (("train", "train", train), ("val", "test", test), ("test", "test", test)):
        ids = (bccd_root / "ImageSets" / "Main" / f"{source}.txt").read_text().split()[:count]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
            (root / folder).mkdir(exist_ok=True)
            for i in ids:
                shutil.copy(bccd_root / folder / f"{i}{suffix}", root / folder / f"{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def bccd_experiment(bccd_root, tmp_path_factory) -> Path:
    """An experiment on 16 BCCD train images (calibration) and 4 test images, with the shipped bundle's classes."""
    root = bccd_subset(bccd_root, tmp_path_factory.mktemp("bccd"), train=16, test=4)
    return write_experiment(root.parent / "bccd.yaml", root, "voc", BCCD_CLASSES)


@pytest.fixture(scope="module")
def int8(bccd_experiment, tmp_path_factory):
    return quantize_bundle(SHIPPED, bccd_experiment, tmp_path_factory.mktemp("out") / "bccd-nano-int8.bundle")


@pytest.fixture(scope="module")
def int8_tensorrt(bccd_experiment, tmp_path_factory) -> dict:
    """`trainer quantize --for tensorrt` on 8 calibration images: the QuantizeResult as the command prints it."""
    out = tmp_path_factory.mktemp("out") / "bccd-nano-int8-trt.bundle"
    result = runner.invoke(app, ["quantize", str(SHIPPED), "--data", str(bccd_experiment), "-o", str(out),
                                 "--for", "tensorrt", "--calibration-images", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_float_nodes_are_the_decode_tail_and_the_focus_stem() -> None:
    model = onnx.load(str(SHIPPED / "model.onnx"))
    by_name = {node.name: node for node in model.graph.node}
    tail = {by_name[name].op_type for name in decode_tail(model)}
    stem = [by_name[name].op_type for name in input_stem(model)]
    assert {"Exp", "Sigmoid", "Transpose", "Reshape"} <= tail and "Conv" not in tail
    assert sorted(stem) == ["Concat"] + ["Slice"] * 4  # YOLOX's Focus


@pytest.mark.slow  # quantizes the nano bundle: about 5 s on 2 cores
def test_int8_bundle_is_a_bundle_of_its_own(int8, bccd_experiment) -> None:
    bundle = load_bundle(int8.bundle)
    source = load_bundle(SHIPPED)
    assert bundle.sha256 == sha256_file(bundle.onnx_path) == int8.sha256 != source.sha256
    meta, fp32 = bundle.meta, source.meta
    assert meta.name == "bccd-nano-int8"
    assert (meta.class_names, meta.input_hw, meta.preprocess, meta.thresholds) == (
        fp32.class_names, fp32.input_hw, fp32.preprocess, fp32.thresholds
    )
    assert meta.weights is None and meta.metrics == {}  # the fp32 weights and metrics are not this model's
    provenance = meta.provenance
    assert meta.format_version == 4 and provenance.dataset == fp32.provenance.dataset  # 4: golden frames too
    assert provenance.source_bundle.model_dump() == {"name": "bccd-nano.bundle", "sha256": source.sha256}
    assert provenance.calibration.model_dump() == {
        "experiment": str(bccd_experiment), "dataset": "synthetic-voc", "split": "train", "images": 16,
        "fingerprint": provenance.calibration.fingerprint, "method": "minmax", "target": "onnxruntime",
    }  # fmt: skip
    assert int8.calibration_images == 16 and int8.target == "onnxruntime"
    ops = {node.op_type for node in onnx.load(str(bundle.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


@pytest.mark.slow
def test_an_onnxruntime_int8_bundle_is_refused_for_tensorrt_before_it_parses(int8) -> None:
    with pytest.raises(BackendError, match=r"bccd-nano-int8.bundle/model.onnx: streamd's TensorRT backend builds symmetric int8 Q/DQ only.*--for tensorrt") as refused:
        check_qdq(load_bundle(int8.bundle).onnx_path)
    assert re.search(r"zero point is uint8, not int8: \d+ node", str(refused.value))  # the activations
    assert re.search(r"zero point is int32, not int8: \d+ node", str(refused.value))  # the biases


@pytest.mark.slow
def test_tensorrt_int8_bundle_has_symmetric_int8_qdq_only(int8_tensorrt) -> None:
    bundle = load_bundle(int8_tensorrt["bundle"])
    model = onnx.load(str(bundle.onnx_path))
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    qdq = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 100
    for node in qdq:
        zero = constants[node.input[2]]  # explicit: a QuantizeLinear without one would output uint8
        assert zero.data_type == onnx.TensorProto.INT8 and not onnx.numpy_helper.to_array(zero).any(), node.name
    assert check_qdq(bundle.onnx_path)  # what serialize_engine asks before TensorRT parses
    calibration = bundle.meta.provenance.calibration
    assert (calibration.target, calibration.images, int8_tensorrt["target"]) == ("tensorrt", 8, "tensorrt")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_int8_detections_stay_close_to_fp32(request, bccd_root, target) -> None:
    """Every fp32 detection scoring 0.5 or more has an int8 one of its class with IoU >= 0.7; counts stay close.

    Boxes nearer the 0.3 threshold may cross it either way (16 calibration images, 8 for the tensorrt
    layout: a few at 0.33-0.45 do). The tensorrt layout runs on ONNX Runtime too.
    """
    bundle = request.getfixturevalue("int8").bundle if target == "onnxruntime" else request.getfixturevalue("int8_tensorrt")["bundle"]
    names = (bccd_root / "ImageSets" / "Main" / "val.txt").read_text().split()[:6]  # not calibrated on
    images = [cv2.imread(str(bccd_root / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR) for name in names]
    fp32, _ = bundle_detector(SHIPPED)
    quantized, _ = bundle_detector(bundle)
    for expected, actual in zip(fp32.detect(images, CONF, IOU), quantized.detect(images, CONF, IOU)):
        assert abs(len(actual.xyxy) - len(expected.xyxy)) <= max(3, len(expected.xyxy) // 4)
        sure = expected.confidence >= 0.5
        for box, label in zip(expected.xyxy[sure], expected.class_id[sure]):
            same = actual.xyxy[actual.class_id == label]
            assert len(same) and iou(box, same).max() >= 0.7, f"class {label} at {box} lost in int8"


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box [4] with each of boxes [N, 4]."""
    top_left, bottom_right = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
    areas = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (np.prod(box[2:] - box[:2]) + areas - inter)


@pytest.mark.slow
def test_eval_compare_reports_the_ap_change(int8, bccd_experiment, tmp_path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", int8.bundle, "--data", str(bccd_experiment), "--out", str(out), "--compare", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    changes = json.loads((out / "comparison.json").read_text())
    assert changes["reference"] == str(SHIPPED)
    row = changes["metrics"]["coco_ap50"]
    assert row["change"] == pytest.approx(row["model"] - row["reference"])
    assert "against" in result.output and "coco_ap50" in result.output


@pytest.mark.slow
def test_quantized_bundle_is_refused_as_a_source(int8, bccd_experiment, tmp_path) -> None:
    result = runner.invoke(app, ["quantize", int8.bundle, "--data", str(bccd_experiment), "-o", str(tmp_path / "again.bundle")])
    assert result.exit_code == 1
    assert "already quantized" in result.output and "model.onnx" in result.output


def not_a_bundle(tmp_path: Path, experiment: Path) -> tuple[Path, Path]:
    (tmp_path / "empty.bundle").mkdir()
    return tmp_path / "empty.bundle", experiment


def other_classes(tmp_path: Path, experiment: Path) -> tuple[Path, Path]:
    text = experiment.read_text().replace("- RBC\n- WBC\n- Platelets", "- RBC\n- WBC")
    return SHIPPED, write_text(tmp_path / "two-classes.yaml", text)


def empty_train_split(tmp_path: Path, experiment: Path) -> tuple[Path, Path]:
    root = tmp_path / "empty"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("")
    return SHIPPED, write_experiment(tmp_path / "empty.yaml", root, "voc", BCCD_CLASSES)


def invalid_experiment(tmp_path: Path, experiment: Path) -> tuple[Path, Path]:
    return SHIPPED, write_text(tmp_path / "bad.yaml", experiment.read_text() + "epochz: 3\n")


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make, exit_code, names",
    [
        (not_a_bundle, 1, "empty.bundle"),
        (other_classes, 1, "two-classes.yaml"),
        (empty_train_split, 1, "empty.yaml"),
        (invalid_experiment, 2, "bad.yaml"),
    ],
)
def test_bad_inputs_are_one_clear_line(bccd_experiment, tmp_path, make, exit_code: int, names: str) -> None:
    bundle, experiment = make(tmp_path, bccd_experiment)
    out = tmp_path / "out.bundle"
    result = runner.invoke(app, ["quantize", str(bundle), "--data", str(experiment), "-o", str(out)])
    assert result.exit_code == exit_code, result.output
    assert names in result.output and "Traceback" not in result.output
    if exit_code == 1:
        assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_calibration_images_that_cannot_be_read_are_named(bccd_experiment, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(cv2, "imread", lambda *args: None)  # readable when the split was listed, not any more
    with pytest.raises(ValueError, match=r"bccd.yaml: none of the 16 calibration images could be read"):
        quantize_bundle(SHIPPED, bccd_experiment, tmp_path / "out.bundle")
    assert "BloodImage_" in caplog.text and "left out of calibration" in caplog.text
    assert not (tmp_path / "out.bundle").exists()


def test_an_unknown_target_is_one_clear_line(bccd_experiment, tmp_path) -> None:
    result = runner.invoke(app, ["quantize", str(SHIPPED), "--data", str(bccd_experiment), "-o", str(tmp_path / "o.bundle"), "--for", "openvino"])
    assert result.exit_code == 1 and "quantize target must be one of onnxruntime, tensorrt, got 'openvino'" in result.output
    assert not (tmp_path / "o.bundle").exists()


def test_output_over_the_source_is_refused(bccd_experiment) -> None:
    result = runner.invoke(app, ["quantize", str(SHIPPED), "--data", str(bccd_experiment), "-o", str(SHIPPED)])
    assert result.exit_code == 1 and "is the source bundle" in result.output


def test_calibration_set_is_the_train_split_through_the_bundle_letterbox(bccd_experiment) -> None:
    from trainer.config import load_experiment

    bundle = load_bundle(SHIPPED)
    calibration = calibration_set(load_experiment(bccd_experiment), bundle, max_images=5)
    assert calibration.split == "train" and len(calibration.paths) == 5
    batches = list(calibration.batches(2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [len(b) for b in calibration.batches(2, drop_last=True)] == [2, 2]
    assert batches[0].shape[1:] == (3, *bundle.meta.input_hw) and batches[0].dtype == np.float32
    image = cv2.imread(str(calibration.paths[0]), cv2.IMREAD_COLOR)
    expected = letterbox(image, bundle.meta.input_hw, bundle.meta.preprocess).tensor  # 640x480 -> 416x312, then padding
    np.testing.assert_array_equal(batches[0][0], expected)
    assert (expected[:, 312:, :] == bundle.meta.preprocess.pad_value).all()
