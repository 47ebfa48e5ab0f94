"""trainer.export.engine and .calibration: the int8 calibrator and its cache key, against fake tensorrt/torch modules."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import trainer.export.calibration as calibration_module
from streamd.errors import BackendError
from streamd.model import load_bundle, write_bundle
from synthetic import write_experiment
from tests.streamd.backends.fake_trt_build import FakeTRTBuild, fake_build_torch
from tests.streamd.backends.test_tensorrt_build import qdq_onnx_bytes
from tests.streamd.conftest import bundle_meta, tiny_onnx_bytes
from trainer.config import load_experiment
from trainer.export.calibration import calibration_set
from trainer.export.engine import build_engine, make_int8_calibrator


@pytest.fixture
def fake_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRTBuild)
    monkeypatch.setitem(sys.modules, "torch", fake_build_torch())
    FakeTRTBuild.builds.clear()
    return FakeTRTBuild


@pytest.fixture
def dataset(voc_dataset, tmp_path) -> Path:
    """A copy of the synthetic VOC set that a test may change."""
    return Path(shutil.copytree(voc_dataset.root, tmp_path / "voc"))


@pytest.fixture
def experiment(voc_dataset, dataset, tmp_path) -> Path:
    return write_experiment(tmp_path / "exp.yaml", dataset, "voc", voc_dataset.classes)


@pytest.fixture
def bundle(voc_dataset, tmp_path):
    """The hand-built 64x64 model with the synthetic set's classes (the calibration refuses other classes)."""
    return write_bundle(tmp_path / "syn.bundle", tiny_onnx_bytes(), {**bundle_meta("syn"), "class_names": list(voc_dataset.classes)})


# --- the calibrator keeps what went wrong (TensorRT's bindings would swallow it) ---


def batches_then(error: Exception, good: int = 1):
    for _ in range(good):
        yield np.zeros((2, 3, 64, 64), np.float32)
    raise error


@pytest.mark.parametrize(
    "batches, message",
    [
        (batches_then(ValueError("img_0007.jpg: cannot be letterboxed")), r"exp.yaml: int8 calibration stopped at batch 2: img_0007.jpg"),
        (iter([np.zeros((1, 3, 64, 64), np.float32)]), r"exp.yaml: .* batch 1: got a float32 batch of shape \(1, 3, 64, 64\), TensorRT reads float32 \[2"),
        (iter([]), r"exp.yaml: .* batch 1: no calibration batch of 2 readable images"),
    ],
)
def test_get_batch_keeps_its_error_and_ends_the_calibration(fake_build, tmp_path, batches, message):
    calibrator = make_int8_calibrator(batches, 2, tmp_path / "calibration.cache", "exp.yaml")
    fed = []
    while (pointers := calibrator.get_batch(["images"])) is not None:
        fed.append(pointers)
    assert calibrator.error is not None
    with pytest.raises(ValueError, match=message):
        raise calibrator.error
    assert calibrator.get_batch(["images"]) is None  # and stays ended
    assert len(fed) == (1 if "img_0007" in message else 0)


def test_a_bad_calibration_image_fails_build_engine_naming_it_and_the_experiment(fake_build, bundle, experiment, monkeypatch, tmp_path):
    real = calibration_module.letterbox

    def letterbox(image, input_hw, preprocess):
        letterbox.calls += 1
        if letterbox.calls == 3:
            raise ValueError("image has 0 rows")
        return real(image, input_hw, preprocess)

    letterbox.calls = 0
    monkeypatch.setattr(calibration_module, "letterbox", letterbox)
    with pytest.raises(BackendError, match=r"model.onnx: int8 calibration failed.*exp.yaml: int8 calibration stopped at batch 1: .*img_002.jpg: cannot be letterboxed"):
        build_engine(bundle.path, "int8", 4, experiment, 8, tmp_path / "engines")  # batches of 4: the third image is in the first
    assert not (tmp_path / "engines").exists()


# --- the calibration cache and the engine follow the calibration images ---


def test_fingerprint_follows_the_images_their_count_and_the_letterbox(bundle, experiment, dataset, tmp_path):
    exp = load_experiment(experiment)
    first = calibration_set(exp, bundle, 6, experiment)
    assert calibration_set(exp, bundle, 6, experiment).fingerprint() == first.fingerprint()
    assert calibration_set(exp, bundle, 5, experiment).fingerprint() != first.fingerprint()
    moved = Path(shutil.copytree(dataset, tmp_path / "moved"))
    moved_exp = load_experiment(write_experiment(tmp_path / "moved.yaml", moved, "voc", exp.classes))
    assert calibration_set(moved_exp, bundle, 6).fingerprint() == first.fingerprint()  # same images elsewhere
    other_pad = bundle.meta.model_copy(update={"preprocess": bundle.meta.preprocess.model_copy(update={"pad_value": 0})})
    assert calibration_set(exp, type(bundle)(bundle.path, other_pad), 6).fingerprint() != first.fingerprint()
    before = first.fingerprint()  # read from the files: it follows their contents
    first.paths[2].write_bytes(first.paths[2].read_bytes() + b"\0")  # same name, new contents
    assert calibration_set(exp, bundle, 6, experiment).fingerprint() != before


def test_new_calibration_images_recalibrate_and_rebuild_the_engine(fake_build, bundle, experiment, tmp_path):
    engines = tmp_path / "engines"
    first = build_engine(bundle.path, "int8", 16, experiment, 8, engines)
    (build,) = fake_build.builds
    shape = (8, 3, 64, 64)
    assert build["calibration_profile"].shapes["images"] == (shape, shape, shape) and len(build["calibration_batches"]) == 1
    key = json.loads(Path(first.engine).with_suffix(".json").read_text())["calibration_key"]
    assert build["calibrator"].cache_path == bundle.path / f"calibration-{bundle.sha256[:12]}-{key[:16]}.cache"
    assert build_engine(bundle.path, "int8", 16, experiment, 8, engines).engine == first.engine
    assert len(fake_build.builds) == 1  # same images: the cached engine
    build_engine(bundle.path, "int8", 16, experiment, 16, engines)  # 16 images now: another calibration
    assert len(fake_build.builds) == 2
    second_key = json.loads(Path(first.engine).with_suffix(".json").read_text())["calibration_key"]
    assert second_key != key and fake_build.builds[1]["calibrator"].cache_path.name.endswith(f"-{second_key[:16]}.cache")


def test_a_qdq_bundle_builds_int8_without_calibration_data(fake_build, experiment, tmp_path):
    qdq = write_bundle(tmp_path / "qdq.bundle", qdq_onnx_bytes(np.array(0, np.int8)), bundle_meta("qdq"))
    result = build_engine(qdq.path, "int8", 4, None, 8, tmp_path / "engines")
    assert Path(result.engine).is_file() and fake_build.builds[-1]["calibrator"] is None
    with pytest.raises(ValueError, match=r"qdq.bundle/model.onnx: the model carries its own int8 scales .*without --data"):
        build_engine(load_bundle(qdq.path).path, "int8", 4, experiment, 8, tmp_path / "engines2")
    plain = write_bundle(tmp_path / "plain.bundle", tiny_onnx_bytes(), bundle_meta("plain"))
    with pytest.raises(ValueError, match=r"plain.bundle: int8 needs calibration images: .*--data .*trainer quantize --for tensorrt"):
        build_engine(plain.path, "int8", 4, None, 8, tmp_path / "engines3")


def test_a_calibration_that_failed_midway_leaves_no_cache_to_be_reused(fake_build, bundle, experiment, monkeypatch, tmp_path):
    """TensorRT writes the scales of the batches it got also after a failed one: kept, the next build with the same
    images would read them and skip the calibration, silently, on a fraction of the data."""
    real = calibration_module.letterbox

    def letterbox(image, input_hw, preprocess):
        letterbox.calls += 1
        if letterbox.calls == 6:  # the second batch of 4 fails (a transient error: the images are fine)
            raise ValueError("CUDA out of memory")
        return real(image, input_hw, preprocess)

    letterbox.calls = 0
    monkeypatch.setattr(calibration_module, "letterbox", letterbox)
    with pytest.raises(BackendError, match="int8 calibration stopped at batch 2"):
        build_engine(bundle.path, "int8", 4, experiment, 8, tmp_path / "engines")
    assert list(bundle.path.glob("calibration-*.cache")) == []
    monkeypatch.setattr(calibration_module, "letterbox", real)
    build_engine(bundle.path, "int8", 4, experiment, 8, tmp_path / "engines")
    assert len(fake_build.builds[-1]["calibration_batches"]) == 2  # calibrated on every batch this time
    assert len(list(bundle.path.glob("calibration-*.cache"))) == 1
