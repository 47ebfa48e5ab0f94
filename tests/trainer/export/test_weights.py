"""trainer.export.weights and the bundle's format 2: weights.safetensors beside model.onnx, checked on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from streamd.errors import BundleError
from streamd.model import load_bundle
from trainer.config import Experiment
from trainer.export.bundle import export_model
from trainer.yolox_adapter import build_model, inference_model

INPUT_HW = (64, 64)


def experiment(architecture: str = "yolox_nano", classes=("a", "b")) -> Experiment:
    return Experiment.model_validate({
        "name": "weights-test", "classes": list(classes),
        "dataset": {"name": "nowhere", "format": "voc", "root": "/no/such/dataset"},
        "model": {"architecture": architecture, "input_hw": list(INPUT_HW)},
    })  # fmt: skip


def untrained(exp: Experiment, seed: int = 0) -> torch.nn.Module:
    """A fresh model with random batch-norm statistics, so that folding them away would show."""
    torch.manual_seed(seed)
    model = build_model(exp.model.architecture, len(exp.classes))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    exp = experiment()
    model = untrained(exp)
    out = tmp_path_factory.mktemp("bundles") / "weights.bundle"
    export_model(model, exp, out, epochs=0, dataset_hash="0" * 64, checkpoint="", metrics={})
    return exp, model, load_bundle(out)


def test_export_writes_weights_that_rebuild_the_onnx_model(exported):
    exp, model, bundle = exported
    meta = bundle.meta
    assert meta.format_version == 2 and bundle.weights_path == bundle.path / "weights.safetensors"
    assert meta.weights.sha256 == hashlib.sha256(bundle.weights_path.read_bytes()).hexdigest()
    assert meta.yolox.model_dump() == {
        "depth": 0.33, "width": 0.25, "depthwise": True, "act": "silu", "num_classes": 2, "strides": (8, 16, 32)
    }  # fmt: skip
    state = load_file(bundle.weights_path)
    assert set(state) == set(model.state_dict())  # batch-norm statistics included
    rebuilt = build_model(meta.architecture, meta.yolox.num_classes)
    rebuilt.load_state_dict(state)
    batch = np.random.default_rng(1).uniform(0, 255, (2, 3, *INPUT_HW)).astype(np.float32)
    with torch.inference_mode():
        ours = inference_model(rebuilt)(torch.from_numpy(batch)).numpy()
    (theirs,) = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"]).run(None, {"images": batch})
    np.testing.assert_allclose(ours[..., 4:], theirs[..., 4:], atol=1e-4)
    np.testing.assert_allclose(ours[..., :4], theirs[..., :4], rtol=1e-3, atol=1e-3)


def _rewrite(bundle_path: Path, change) -> None:
    meta_path = bundle_path / "bundle.json"
    meta = json.loads(meta_path.read_text())
    change(meta)
    meta_path.write_text(json.dumps(meta))


def _drop_weights(meta: dict) -> None:
    meta.pop("weights")
    meta.pop("yolox")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("yolox"), "weights and yolox come together"),
        (lambda m: m.pop("weights"), "weights and yolox come together"),
        (lambda m: m.update(format_version=1), "weights and yolox need format_version 2"),
        (lambda m: m.update(format_version=5), "format_version"),
        (lambda m: m["yolox"].update(num_classes=3), "yolox.num_classes is 3 but class_names names 2"),
        (lambda m: m["yolox"].update(act="gelu"), "yolox.act"),
        (lambda m: m["weights"].update(file="other.safetensors"), "other.safetensors: missing"),
        (lambda m: m["weights"].update(sha256="0" * 64), "does not match weights.sha256"),
        (lambda m: m["weights"].update(format="pickle"), "weights.format"),
        (_drop_weights, None),  # format 2 without weights: ONNX only
        (lambda m: (_drop_weights(m), m.update(format_version=1)), None),  # a format-1 bundle still loads
    ],
)
def test_bundle_weights_fields_are_checked(exported, tmp_path, change, message):
    import shutil

    _, _, bundle = exported
    copy = Path(shutil.copytree(bundle.path, tmp_path / "copy.bundle"))
    _rewrite(copy, change)
    if message is None:
        assert load_bundle(copy).weights_path is None
    else:
        with pytest.raises(BundleError, match=message):
            load_bundle(copy)


def test_changed_weights_file_is_refused(exported, tmp_path):
    import shutil

    _, _, bundle = exported
    copy = Path(shutil.copytree(bundle.path, tmp_path / "copy.bundle"))
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors: sha256 .* does not match weights.sha256"):
        load_bundle(copy)
    assert load_bundle(copy, verify=False).weights_path.is_file()
