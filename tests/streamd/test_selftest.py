"""streamd.selftest: golden frames through the configured backend before READY=1, refused on a mismatch.

The swapped model: a copy of the shipped fp32 bundle whose model.onnx and weights.safetensors were replaced by an
untrained YOLOX nano's export, with bundle.json's sha256s updated so that only the self-test can tell.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamd.config import OnnxRuntimeConfig, TorchConfig
from streamd.errors import BundleError
from streamd.model import load_bundle
from streamd.model.bundle import META_FILE
from streamd.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.ops.prometheus import MetricsServer, RunCollector
from streamd.selftest import GOLDEN_IMAGES, golden_frames, self_test, synthetic_frames
from tests.streamd import media

REPO = Path(__file__).resolve().parents[2]
FP32 = REPO / "models" / "bccd-nano.bundle"
INT8 = REPO / "models" / "bccd-nano-int8.bundle"
BACKENDS = [
    pytest.param(OnnxRuntimeConfig(type="onnxruntime", threads=1), id="onnxruntime"),
    pytest.param(TorchConfig(type="torch", device="cpu"), id="torch-cpu"),
]


def built(bundle_path: Path, config):
    from streamd.backends.select import make_backend

    bundle = load_bundle(bundle_path)
    return bundle, Detector.for_bundle(bundle, make_backend(bundle, config, max_batch=4))


def without_golden(source: Path, out: Path) -> Path:
    """A copy of `source` as it was before format 4: no golden/ folder, no golden entry."""
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("golden"))
    raw = json.loads((out / META_FILE).read_text())
    raw.pop("golden")
    raw["format_version"] = 3 if "calibration" in raw["provenance"] else 2
    (out / META_FILE).write_text(json.dumps(raw, indent=2))
    return out


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory) -> Path:
    """An untrained YOLOX nano for BCCD's classes and input size, exported with the real exporter."""
    import torch

    from trainer.config import Experiment
    from trainer.export.bundle import export_model
    from trainer.yolox_adapter import build_model

    exp = Experiment.model_validate({
        "name": "untrained", "classes": ["RBC", "WBC", "Platelets"],
        "dataset": {"name": "nowhere", "format": "voc", "root": "/no/such/dataset"},
        "model": {"architecture": "yolox_nano", "input_hw": [416, 416]},
    })  # fmt: skip
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("untrained") / "untrained.bundle"
    export_model(build_model("yolox_nano", 3).eval(), exp, out, epochs=0, dataset_hash="0" * 64, checkpoint="", metrics={})
    return out


def swapped(into: Path, model_from: Path, out: Path, golden: bool = True, fields=("onnx", "weights")) -> Path:
    """A copy of bundle `into` (with or without its golden frames) whose model files (`fields`) are `model_from`'s,
    its bundle.json's sha256s made to match: load_bundle accepts it, only the self-test can see the swap."""
    if golden:
        shutil.copytree(into, out)
    else:
        without_golden(into, out)
    raw = json.loads((out / META_FILE).read_text())
    for field in fields:
        name = raw[field]["file"]
        shutil.copyfile(model_from / name, out / name)
        raw[field]["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / META_FILE).write_text(json.dumps(raw, indent=2))
    load_bundle(out)
    return out


@pytest.mark.parametrize("config", BACKENDS)
@pytest.mark.parametrize("bundle_path", [FP32, INT8], ids=["fp32", "int8"])
def test_the_shipped_bundles_pass_on_their_golden_frames(bundle_path, config):
    if config.type == "torch" and load_bundle(bundle_path).weights_path is None:
        pytest.skip("the int8 bundle has no torch weights")
    bundle, detector = built(bundle_path, config)
    result = self_test(bundle, detector, config)
    assert (result.backend, result.device, result.precision, result.golden) == (config.type, "cpu", "fp32", "bundle")
    assert result.frames == GOLDEN_IMAGES and result.reference_boxes >= 10 * GOLDEN_IMAGES  # BCCD: many cells


@pytest.mark.parametrize("config", BACKENDS)
def test_an_older_bundle_passes_on_synthetic_frames_with_detections(tmp_path, config):
    bundle, detector = built(without_golden(FP32, tmp_path / "old.bundle"), config)
    result = self_test(bundle, detector, config)
    assert result.golden == "synthetic" and result.frames == 4
    assert result.reference_boxes > 0  # the comparison is not of empty lists


@pytest.mark.parametrize("config", BACKENDS)
@pytest.mark.parametrize("golden", [True, False], ids=["golden", "synthetic"])
def test_a_swapped_model_is_refused_naming_backend_device_precision_and_frame(tmp_path, untrained_bundle, config, golden):
    if config.type == "onnxruntime" and not golden:
        pytest.skip("without golden frames the reference is model.onnx on ONNX Runtime itself: nothing to catch")
    # without golden frames the reference is model.onnx: what is caught is torch weights that are not that model
    fields = ("onnx", "weights") if golden else ("weights",)
    bundle, detector = built(swapped(FP32, untrained_bundle, tmp_path / "swapped.bundle", golden, fields), config)
    with pytest.raises(BundleError) as refused:
        self_test(bundle, detector, config)
    assert f"self-test failed: backend {config.type} on cpu, precision fp32" in str(refused.value)
    assert "frame 0 (" in str(refused.value) and "refusing to start" in str(refused.value)


def test_the_int8_model_in_the_fp32_bundle_is_refused_on_onnxruntime(tmp_path):
    out = tmp_path / "int8-inside.bundle"
    shutil.copytree(FP32, out)
    shutil.copyfile(INT8 / "model.onnx", out / "model.onnx")
    raw = json.loads((out / META_FILE).read_text())
    raw["onnx"]["sha256"] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    (out / META_FILE).write_text(json.dumps(raw))
    config = OnnxRuntimeConfig(type="onnxruntime", threads=1)
    bundle, detector = built(out, config)
    with pytest.raises(BundleError, match=r"self-test failed: backend onnxruntime on cpu, precision fp32 .* frame \d"):
        self_test(bundle, detector, config)


def test_a_changed_golden_image_is_refused_by_its_sha256(tmp_path):
    out = shutil.copytree(FP32, tmp_path / "b.bundle")
    (out / "golden" / "frame-2.png").write_bytes((out / "golden" / "frame-1.png").read_bytes())
    with pytest.raises(BundleError, match=r"golden/frame-2\.png: sha256 .* does not match golden\.images\[2\]\.sha256"):
        load_bundle(out)


def test_synthetic_frames_are_the_same_every_time():
    first, second = synthetic_frames((416, 416)), synthetic_frames((416, 416))
    assert len(first) == 4 and all((a == b).all() for a, b in zip(first, second))
    assert all(frame.shape == (416, 416, 3) and not frame.flags.writeable for frame in first)
    assert len({frame.tobytes() for frame in first}) == 4


def test_golden_frames_read_back_as_written():
    golden = golden_frames(load_bundle(FP32))
    assert golden.names == tuple(f"golden/frame-{i}.png" for i in range(4))
    assert all(image.shape[:2] == (312, 416) for image in golden.images)  # BCCD's 640x480 scaled to fit 416
    assert golden.reference == "onnxruntime fp32 (CPU)" and golden.source == "BCCD/val: the first 4 images"


def test_the_result_is_a_gauge_in_metrics():
    config = OnnxRuntimeConfig(type="onnxruntime", threads=1)
    result = self_test(*built(FP32, config), config)
    server = MetricsServer("127.0.0.1:0", RunCollector(Metrics(["a"]), [], [], result), lambda: [])
    server.start()
    try:
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30).read().decode()
    finally:
        server.close()
    assert 'streamd_selftest_passed{backend="onnxruntime",device="cpu",golden="bundle",precision="fp32"} 1.0' in text


RUN_CONFIG = """
    model: {model}
    backend: {backend}
    streams:
      - id: cam
        source: {video}
    publish: {{enabled: false}}
"""


@pytest.mark.parametrize("backend", ["{type: onnxruntime, threads: 1}", "{type: torch, device: cpu}"], ids=["onnxruntime", "torch-cpu"])
def test_streamd_run_refuses_a_swapped_model_with_one_line_and_exit_1(tmp_path, untrained_bundle, clip, backend):
    model = swapped(FP32, untrained_bundle, tmp_path / "swapped.bundle")
    config = media.write_config(tmp_path, RUN_CONFIG.format(model=model, backend=backend, video=clip))
    done = subprocess.run([sys.executable, "-m", "streamd.cli", "run", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    refusal = [line for line in done.stderr.splitlines() if "self-test failed" in line]
    assert len(refusal) == 1 and "precision fp32" in refusal[0] and "frame " in refusal[0]


def test_streamd_run_starts_with_the_shipped_bundle(tmp_path, clip):
    config = media.write_config(tmp_path, RUN_CONFIG.format(model=FP32, backend="{type: onnxruntime, threads: 1}", video=clip))
    done = subprocess.run([sys.executable, "-m", "streamd.cli", "run", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "self-test passed: backend onnxruntime on cpu, precision fp32" in done.stderr
