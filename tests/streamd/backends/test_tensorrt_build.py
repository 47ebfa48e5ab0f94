"""streamd.backends.tensorrt_build: the engine build (flags, profiles, int8 scales) and its cache, against fake_trt_build."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from streamd.backends import tensorrt_build
from streamd.backends.tensorrt_build import build_engine, engine_key, serialize_engine, write_cache
from streamd.errors import BackendError
from streamd.model import load_bundle, write_bundle
from tests.streamd.backends.fake_trt_build import FakeCalibrator, FakeTRTBuild, fake_build_torch, fake_trt11
from tests.streamd.conftest import bundle_meta

REPO = Path(__file__).parents[3]


@pytest.fixture
def fake_build(monkeypatch):
    """tensorrt and torch as far as an engine build goes (no runtime: streamd.backends.tensorrt is not used)."""
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRTBuild)
    monkeypatch.setitem(sys.modules, "torch", fake_build_torch())
    monkeypatch.setattr(FakeTRTBuild, "build_returns_none", False)
    FakeTRTBuild.builds.clear()
    return FakeTRTBuild


# --- precision flags ---


OBEY = "obey_precision_constraints"


@pytest.mark.parametrize("precision, flags, cleared", [("fp32", set(), {"tf32"}), ("fp16", {"fp16", OBEY}, set())])
def test_fp32_clears_tf32_and_fp16_keeps_it(tiny_bundle, fake_build, caplog, precision, flags, cleared):
    caplog.set_level("INFO")
    serialize_engine(fake_build, tiny_bundle, precision, 4, 64)
    (build,) = fake_build.builds
    assert build["flags"] == flags and build["cleared"] == cleared
    assert ("TF32 cleared" in caplog.text) == (precision == "fp32")


# YOLOX's in-graph decode in the shipped model (trainer export): the grid add, the stride multiply, exp, the concat.
DECODE_LAYERS = {"/head/Add", "/head/Mul", "/head/Exp", "/head/Mul_1", "/head/Concat_24", "/head/Concat_6"}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_fp16_holds_yoloxs_in_graph_decode_in_fp32_and_nothing_before_it(fake_build, precision):
    """fp16 would quantise a centre near 640 px to 0.5 px and overflow exp(wh) * stride above wh ~ 7.6: the decode
    layers get precision and output type float32 (binding with OBEY_PRECISION_CONSTRAINTS); the convolutions, the
    sigmoids and the shape arithmetic (int64) are left to TensorRT. fp32 needs no constraint."""
    bundle = load_bundle(REPO / "models" / "bccd-nano.bundle")
    serialize_engine(fake_build, bundle, precision, 4, 64)
    (build,) = fake_build.builds
    if precision == "fp32":
        assert build["precisions"] == {} and OBEY not in build["flags"]
        return
    held = set(build["precisions"])
    assert DECODE_LAYERS <= held and set(build["precisions"].values()) == {"float32"}
    assert all(types == {0: "float32"} for types in build["output_types"].values()) and set(build["output_types"]) == held
    assert not [name for name in held if "/Conv" in name or "Sigmoid" in name or "/Shape" in name or "Slice" in name]
    assert not [name for name in held if not name.startswith("/head/")]  # the backbone and neck stay free
    assert OBEY in build["flags"]


# --- int8 with a calibrator (implicit quantization) ---


@pytest.mark.parametrize("max_batch, calibration_batch", [(16, 8), (32, 8), (2, 2)])
def test_calibration_profile_is_the_calibrators_batch_not_max_batch(tiny_bundle, fake_build, max_batch, calibration_batch):
    calibrator = FakeCalibrator(calibration_batch, batches=3)
    serialize_engine(fake_build, tiny_bundle, "int8", max_batch, 64, calibrator)
    (build,) = fake_build.builds
    shape = (calibration_batch, 3, 64, 64)
    assert build["calibration_profile"].shapes["images"] == (shape, shape, shape)  # TensorRT calibrates at opt
    assert build["profiles"][0].shapes["images"] == ((1, 3, 64, 64), (max_batch, 3, 64, 64), (max_batch, 3, 64, 64))
    assert build["calibration_profile"] not in build["profiles"]  # only for calibration: not an engine profile
    assert len(build["calibration_batches"]) == 3 and build["flags"] == {"fp16", "int8", OBEY}


class FailingCalibrator(FakeCalibrator):
    """Keeps the error of its second batch, as trainer.export.engine's calibrator does, and ends the calibration."""

    def get_batch(self, names):
        if self.left == 2:  # of 3: the second batch
            self.error = ValueError("exp.yaml: int8 calibration stopped at batch 2: BloodImage_00007.jpg: bad image")
            return None
        return super().get_batch(names)


def test_an_error_inside_get_batch_fails_the_build_instead_of_a_short_calibration(tiny_bundle, fake_build, tmp_path):
    calibrator = FailingCalibrator(2, batches=3)
    with pytest.raises(BackendError, match=r"model.onnx: int8 calibration failed.*exp.yaml.*batch 2.*BloodImage_00007"):
        build_engine(tiny_bundle, precision="int8", max_batch=2, engine_cache_dir=tmp_path, calibrator=calibrator)
    assert len(fake_build.builds[0]["calibration_batches"]) == 1  # TensorRT saw the calibration end early
    assert list(tmp_path.iterdir()) == []  # nothing cached


def test_build_serialized_network_returning_none_is_a_clear_backend_error(tiny_bundle, fake_build, tmp_path):
    fake_build.build_returns_none = True
    with pytest.raises(BackendError, match=r"model.onnx: TensorRT could not build an engine \(build_serialized_network returned None"):
        build_engine(tiny_bundle, precision="fp16", max_batch=2, engine_cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_11_is_refused_by_the_version_check(tiny_bundle, fake_build, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt11())
    with pytest.raises(BackendError, match=r"TensorRT 10.x is supported, found 11.0.0 .*tensorrt-cu13>=10.13,<11"):
        build_engine(tiny_bundle, precision="fp16", max_batch=2, engine_cache_dir=tmp_path)
    assert fake_build.builds == []


def test_an_engine_calibrated_on_other_data_is_rebuilt(tiny_bundle, fake_build, tmp_path):
    def build(key: str):
        return build_engine(tiny_bundle, precision="int8", max_batch=2, engine_cache_dir=tmp_path,
                            calibrator=FakeCalibrator(2, batches=1), calibration_key=key)  # fmt: skip

    path = build("a" * 64)
    assert json.loads(path.with_suffix(".json").read_text())["calibration_key"] == "a" * 64
    assert build("a" * 64) == path and len(fake_build.builds) == 1  # same images: the cached engine
    assert build("b" * 64) == path and len(fake_build.builds) == 2  # new images: calibrated and built again
    assert json.loads(path.with_suffix(".json").read_text())["calibration_key"] == "b" * 64


# --- int8 from the model's own Q/DQ nodes (explicit quantization) ---


def qdq_onnx_bytes(zero_point: np.ndarray | None) -> bytes:
    """images -> QuantizeLinear -> DequantizeLinear -> output, with this zero point (None: none given)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zero = [] if zero_point is None else ["zero"]
    initializers = [numpy_helper.from_array(np.array(0.02, np.float32), "scale")]
    initializers += [] if zero_point is None else [numpy_helper.from_array(zero_point, "zero")]
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["images", "scale", *zero], ["q"], name="q_images"),
         helper.make_node("DequantizeLinear", ["q", "scale", *zero], ["output"], name="dq_images")],
        "qdq",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 64, 64])],
        initializer=initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize(
    "zero_point, problem",
    [
        (np.array(0, np.int8), None),  # symmetric int8: TensorRT's own scales, no calibrator
        (np.array(128, np.uint8), "zero point is uint8, not int8: 2 node.s., e.g. QuantizeLinear q_images"),  # ONNX Runtime's default
        (np.array(5, np.int8), "zero point is not 0: 2 node.s., e.g. QuantizeLinear q_images"),
        (None, "no zero point, so its output is uint8: 1 node.s., e.g. QuantizeLinear q_images"),
    ],
)
def test_qdq_models_build_without_a_calibrator_when_symmetric_int8(fake_build, tmp_path, zero_point, problem):
    bundle = write_bundle(tmp_path / "qdq.bundle", qdq_onnx_bytes(zero_point), bundle_meta("qdq"))
    if problem is None:
        serialize_engine(fake_build, bundle, "int8", 4, 64)
        (build,) = fake_build.builds
        assert build["flags"] == {"fp16", "int8", OBEY} and build["calibrator"] is None
        with pytest.raises(BackendError, match="already carries its int8 scales"):
            serialize_engine(fake_build, bundle, "int8", 4, 64, FakeCalibrator(2, batches=1))
    else:
        with pytest.raises(BackendError, match=rf"qdq.bundle/model.onnx: streamd's TensorRT backend builds symmetric int8 Q/DQ only.*{problem}.*--for tensorrt"):
            serialize_engine(fake_build, bundle, "int8", 4, 64)
        assert fake_build.builds == []  # refused before TensorRT parsed it


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_a_qdq_model_is_refused_at_another_precision_than_int8(fake_build, tmp_path, precision):
    """TensorRT 10 builds Q/DQ nodes only with the INT8 flag: at the daemon's default fp16 its build would fail
    with no reason given, and auto would fall back from TensorRT."""
    bundle = write_bundle(tmp_path / "qdq.bundle", qdq_onnx_bytes(np.array(0, np.int8)), bundle_meta("qdq"))
    with pytest.raises(BackendError, match=rf"carries int8 Q/DQ nodes.*backend.precision: int8.*not {precision}"):
        serialize_engine(fake_build, bundle, precision, 4, 64)
    assert fake_build.builds == []


def test_a_refused_calibration_profile_stops_the_build(fake_build, tiny_bundle, monkeypatch):
    real = FakeTRTBuild.Builder.create_builder_config

    def refusing(self):
        config = real(self)
        config.set_calibration_profile = lambda profile: False
        return config

    monkeypatch.setattr(FakeTRTBuild.Builder, "create_builder_config", refusing)
    with pytest.raises(BackendError, match="refused the calibration profile of batch 2"):
        serialize_engine(fake_build, tiny_bundle, "int8", 16, 64, FakeCalibrator(2, batches=1))


def test_the_engine_key_changes_with_the_build_recipe(monkeypatch):
    """Engines cached before fp32 cleared TF32 (and int8 calibrated through its own profile) must not be found."""
    before = engine_key("a" * 64, "Fake GPU", "10.0.1", "fp32", 8)
    monkeypatch.setattr(tensorrt_build, "BUILD_RECIPE", tensorrt_build.BUILD_RECIPE - 1)
    assert engine_key("a" * 64, "Fake GPU", "10.0.1", "fp32", 8) != before


def test_int8_without_qdq_nodes_or_calibrator_is_refused(tiny_bundle, fake_build):
    with pytest.raises(BackendError, match=r"needs calibration scales.*trainer build-engine.*trainer quantize --for tensorrt"):
        serialize_engine(fake_build, tiny_bundle, "int8", 4, 64)


# --- the cache write ---


def test_write_cache_fsyncs_the_files_and_their_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    path = tmp_path / "engines" / "key.engine"
    write_cache(path, b"engine", {"precision": "fp16"})
    assert path.read_bytes() == b"engine" and json.loads(path.with_suffix(".json").read_text()) == {"precision": "fp16"}
    folder = str(path.parent)
    assert [s.rsplit(".tmp", 1)[0] for s in synced] == [str(path), folder, str(path.with_suffix(".json")), folder]


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
@pytest.mark.parametrize("failing_call", [1, 2])  # 1: the engine, 2: its JSON note
def test_a_cache_write_that_fails_midway_leaves_no_temp_file(tmp_path, monkeypatch, fail_at, failing_call):
    path = tmp_path / "key.engine"
    path.with_suffix(".json").write_text('{"old": true}\n')
    real = {"fsync": os.fsync, "replace": os.replace}[fail_at]
    calls = []

    def failing(*args):
        is_file = fail_at == "replace" or not os.path.isdir(os.readlink(f"/proc/self/fd/{args[0]}"))
        calls.append(is_file)
        if is_file and calls.count(True) == failing_call:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, fail_at, failing)
    with pytest.raises(OSError, match="No space left"):
        write_cache(path, b"engine" * 1000, {"new": True})
    # No temp file either way, and never a new engine beside an old engine's note (its calibration key would pass
    # for this one's): the old note goes first, and an engine without a note is rebuilt.
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if failing_call == 1 else ["key.engine"])
