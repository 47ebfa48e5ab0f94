"""trainer.export.bundle: a trained checkpoint to a bundle that ONNX Runtime runs like PyTorch, and its score check."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.config import OnnxRuntimeConfig
from streamd.model import load_bundle
from streamd.detector import Detector
from streamd.selftest import GOLDEN_IMAGES, golden_frames, reference_detections, self_test
from synthetic import write_experiment
from trainer.checkpoint import read_checkpoint, save_checkpoint
from trainer.cli import app
from trainer.config import load_experiment
from trainer.export.bundle import export_bundle
from trainer.train import train
from trainer.yolox_adapter import build_model, inference_model

pytestmark = pytest.mark.slow  # these tests train YOLOX (seconds each on 2 cores)

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(voc_dataset, tmp_path_factory):
    """Three epochs, each validated: best.pth has val metrics."""
    config = write_experiment(tmp_path_factory.mktemp("run") / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes, train={"epochs": 3})
    exp = load_experiment(config)
    return exp, train(exp)


def test_export_matches_pytorch_on_onnxruntime(trained, tmp_path):
    exp, result = trained
    export = export_bundle(exp.run_dir, tmp_path / "synthetic.bundle")
    bundle = load_bundle(export.bundle)
    assert bundle.meta.class_names == exp.classes
    assert bundle.meta.provenance.epochs == result.best_epoch
    assert "val_voc_map50" in bundle.meta.metrics
    model = build_model(exp.model.architecture, len(exp.classes))
    model.load_state_dict(torch.load(result.best_checkpoint, weights_only=False)["model"])
    weights = load_file(bundle.weights_path)  # the torch backend's copy: the same (EMA) weights
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()) and weights.keys() == model.state_dict().keys()
    model = inference_model(model)
    batch = np.random.default_rng(0).uniform(0, 255, (3, 3, 96, 96)).astype(np.float32)  # dynamic N
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"images": batch})
    assert actual.shape == expected.shape == (3, 12 * 12 + 6 * 6 + 3 * 3, 5 + 2)  # anchors at strides 8, 16, 32
    max_abs = float(np.abs(actual - expected).max())
    print(f"ORT vs PyTorch max abs difference: {max_abs:.2e}")
    np.testing.assert_allclose(actual[..., :4], expected[..., :4], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(actual[..., 4:], expected[..., 4:], atol=1e-4)


def test_export_cli_and_bad_source(trained, tmp_path):
    exp, _ = trained
    result = runner.invoke(app, ["export", str(exp.run_dir), "-o", str(tmp_path / "x.bundle")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sha256"] == load_bundle(tmp_path / "x.bundle").sha256
    result = runner.invoke(app, ["export", str(tmp_path / "missing"), "-o", str(tmp_path / "y.bundle")])
    assert result.exit_code == 1 and "no such checkpoint" in result.output


def confident(checkpoint):
    """Objectness and class biases at +10: every anchor scores about 1 (sigmoid(10)^2)."""
    weights = {k: torch.full_like(v, 10.0) if k.startswith(("head.obj_preds.", "head.cls_preds.")) and k.endswith(".bias")
               else v for k, v in checkpoint.model.items()}
    return replace(checkpoint, model=weights)


def dataset_elsewhere(checkpoint):
    experiment = checkpoint.experiment
    return replace(checkpoint, experiment=experiment | {"dataset": experiment["dataset"] | {"root": "/no/such/dataset"}})


@pytest.mark.parametrize(
    ("change", "top_score", "warning"),
    [
        (lambda checkpoint: checkpoint, (0.0, 0.3), "highest score on 5 val images is"),  # 3 epochs: none learnt yet
        (confident, (0.99, 1.0), None),
        (dataset_elsewhere, None, "cannot check the exported model's scores on the val split"),
    ],
    ids=["as-trained", "confident", "dataset-elsewhere"],
)
def test_export_warns_when_no_score_reaches_conf_threshold(trained, tmp_path, caplog, change, top_score, warning):
    exp, result = trained
    path = tmp_path / "best.pth"
    save_checkpoint(path, change(read_checkpoint(Path(result.best_checkpoint))))
    with caplog.at_level(logging.WARNING, logger="trainer.export.bundle"):
        export = export_bundle(path, tmp_path / "x.bundle")
    if top_score is None:
        assert export.val_max_score is None
    else:
        assert top_score[0] <= export.val_max_score < top_score[1]
    if warning:
        assert warning in caplog.text
        if top_score is not None:
            assert f"below the bundle's conf_threshold {exp.export.conf_threshold:.2f}: streamd would detect nothing" in caplog.text
    else:
        assert "conf_threshold" not in caplog.text


def test_export_writes_golden_frames_that_its_own_self_test_passes(trained, tmp_path):
    exp, _ = trained
    bundle = load_bundle(export_bundle(exp.run_dir, tmp_path / "golden.bundle").bundle)
    assert bundle.meta.format_version == 4 and len(bundle.meta.golden.images) == GOLDEN_IMAGES
    assert bundle.meta.golden.source == f"{exp.dataset.name}/val: the first {GOLDEN_IMAGES} images"
    golden = golden_frames(bundle)
    again = reference_detections(bundle, golden.images, golden.conf_threshold, golden.iou_threshold)
    assert [d.xyxy.tolist() for d in again] == [d.xyxy.tolist() for d in golden.detections]  # stored = recomputed
    config = OnnxRuntimeConfig(type="onnxruntime", threads=1)
    assert self_test(bundle, Detector.for_bundle(bundle, OnnxRuntimeBackend(bundle, max_batch=4)), config).frames == 4


@pytest.mark.parametrize("existing", ["bundle", "other files", "a file"])
def test_export_refuses_to_replace_what_is_there_without_overwrite(trained, tmp_path, existing):
    exp, _ = trained
    out = tmp_path / "x.bundle"
    if existing == "a file":
        out.write_text("not a folder")
    else:
        out.mkdir()
        (out / ("bundle.json" if existing == "bundle" else "notes.txt")).write_text("{}")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    with pytest.raises(ValueError, match=rf"{out}: .*(already holds|not a folder)"):
        export_bundle(exp.run_dir, out)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before  # nothing written
    if existing != "a file":
        assert load_bundle(export_bundle(exp.run_dir, out, overwrite=True).bundle).meta.golden is not None


def test_trainer_export_cli_refuses_an_existing_bundle_in_one_line(trained, tmp_path):
    exp, _ = trained
    out = tmp_path / "cli.bundle"
    first = CliRunner().invoke(app, ["export", str(exp.run_dir), "-o", str(out)])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, ["export", str(exp.run_dir), "-o", str(out)])
    assert again.exit_code == 1 and "already holds a bundle; pass --overwrite" in again.output
    assert "Traceback" not in again.output
