"""trainer.train through the API and `trainer train`: the run folder, resume, fresh runs, Ctrl-C (CPU, 96x96 input)."""

from __future__ import annotations

import csv
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from streamd.model import load_bundle
from synthetic import write_experiment
from trainer.checkpoint import read_checkpoint
from trainer.cli import app
from trainer.config import load_experiment
from trainer.export.bundle import export_bundle
from trainer.train import train

pytestmark = pytest.mark.slow  # these tests train YOLOX (seconds each on 2 cores)

runner = CliRunner()


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def trained(voc_dataset, tmp_path_factory):
    """Three epochs straight through, each validated: the reference run."""
    config = write_experiment(tmp_path_factory.mktemp("straight") / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes, train={"epochs": 3})
    exp = load_experiment(config)
    return exp, train(exp)


def test_training_writes_the_run_folder(trained):
    exp, result = trained
    run_dir = exp.run_dir
    for name in ("last.pth", "best.pth", "metrics.csv", "curves.png", "train_result.json", "experiment.json"):
        assert (run_dir / name).is_file(), name
    rows = _rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(r["voc_map50"] for r in rows)  # eval_interval 1: every epoch validated
    assert json.loads((run_dir / "train_result.json").read_text())["epochs"] == 3
    assert result.best_epoch in (1, 2, 3)


def test_resume_replays_the_exact_schedule(trained, voc_dataset, tmp_path):
    """Stopped after 2 epochs and resumed, the run equals the one that went straight through (YOLOX #506)."""
    exp, _ = trained
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes, train={"epochs": 3})
    resumed_exp = load_experiment(config)
    train(resumed_exp, stop_after_epochs=2)
    assert [int(r["epoch"]) for r in _rows(resumed_exp.run_dir)] == [1, 2]
    train(resumed_exp, resume=True)
    straight, resumed = _rows(exp.run_dir), _rows(resumed_exp.run_dir)
    assert [r["epoch"] for r in resumed] == ["1", "2", "3"]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert resumed[-1]["total_loss"] == straight[-1]["total_loss"]
    a = torch.load(exp.run_dir / "last.pth", weights_only=False)["model"]
    b = torch.load(resumed_exp.run_dir / "last.pth", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_is_a_clear_error(voc_dataset, tmp_path):
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes)
    result = runner.invoke(app, ["train", str(config), "--resume"])
    assert result.exit_code == 1
    assert "nothing to resume from" in result.output


@pytest.mark.parametrize(
    "classes, overrides, message",
    [
        (None, {"model": {"input_hw": [100, 96]}}, "input_hw"),
        (None, {"model": {"architecture": "yolox_huge"}}, "architecture"),
        (None, {"train": {"epochz": 3}}, "did you mean 'epochs'"),
        (None, {"train": {"epochs": 2, "warmup_epochs": 2, "no_aug_epochs": 1}}, "exceed epochs"),
        (("a", "a"), {}, "unique"),
    ],
)
def test_bad_experiment_exits_2_with_file_and_line(voc_dataset, tmp_path, classes, overrides, message):
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", classes or voc_dataset.classes, **overrides)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert f"{config}:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_checkpoint_evaluates_and_loads_weights_only(trained):
    """A checkpoint (RNG state included) stays loadable with torch.load(weights_only=True)."""
    from trainer.evaluate import load_detector

    exp, result = trained
    torch.load(result.last_checkpoint, weights_only=True)
    detector = load_detector(Path(result.best_checkpoint), exp)
    assert detector.class_names == exp.classes


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_run_never_keeps_an_earlier_runs_best(voc_dataset, tmp_path):
    """A new run that stops before its first validation must not leave the earlier best.pth for export to ship."""
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes, train={"epochs": 3})
    earlier = train(load_experiment(config), stop_after_epochs=1)  # validated at epoch 1: best.pth
    earlier_best = (tmp_path / "runs" / "synthetic" / "best.pth").read_bytes()
    write_experiment(config, voc_dataset.root, "voc", voc_dataset.classes, train={"epochs": 3, "eval_interval": 3, "seed": 1})

    refused = runner.invoke(app, ["train", str(config), "--stop-after-epochs", "1"])
    assert refused.exit_code == 1
    assert f"{earlier.run_dir} already holds a run (last.pth, best.pth)" in refused.output
    assert "--overwrite" in refused.output
    assert Path(earlier.best_checkpoint).read_bytes() == earlier_best

    result = runner.invoke(app, ["train", str(config), "--stop-after-epochs", "1", "--overwrite"])
    assert result.exit_code == 0, result.output
    best, last = read_checkpoint(Path(earlier.best_checkpoint)), read_checkpoint(Path(earlier.last_checkpoint))
    assert best.val_metrics == {} and same_weights(best.model, last.model)  # not validated: the last weights stand in
    assert [row["epoch"] for row in _rows(Path(earlier.run_dir))] == ["1"]
    bundle = load_bundle(export_bundle(Path(earlier.run_dir), tmp_path / "new.bundle").bundle)
    assert bundle.meta.metrics == {} and bundle.meta.provenance.epochs == 1  # the new run's model, not the earlier best


@pytest.mark.parametrize(
    ("changes", "refused"),
    [
        ({"train": {"epochs": 4}, "augment": {"mosaic_prob": 0.5}},
         ["train.epochs: 3 -> 4", "augment.mosaic_prob: 1.0 -> 0.5"]),
        ({"model": {"input_hw": [64, 64]}}, ["model.input_hw: [96, 96] -> [64, 64]"]),
        ({"train": {"workers": 1, "eval_interval": 2}, "export": {"conf_threshold": 0.5}}, []),
    ],
    ids=["schedule", "model", "machine-and-export"],
)
def test_resume_refuses_a_changed_experiment(voc_dataset, tmp_path, changes, refused):
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes, train={"epochs": 3})
    first = train(load_experiment(config), stop_after_epochs=1)
    train_section = {"epochs": 3} | changes.get("train", {})
    write_experiment(config, voc_dataset.root, "voc", voc_dataset.classes, **(changes | {"train": train_section}))
    result = runner.invoke(app, ["train", str(config), "--resume"])
    if refused:
        assert result.exit_code == 1
        assert f"{first.last_checkpoint} was trained with other settings: {'; '.join(sorted(refused))}" in result.output
        assert read_checkpoint(Path(first.last_checkpoint)).epoch == 1
    else:
        assert result.exit_code == 0, result.output
        resumed = read_checkpoint(Path(first.last_checkpoint))
        assert resumed.epoch == 3 and resumed.experiment["export"]["conf_threshold"] == 0.5


@pytest.mark.slow
def test_ctrl_c_says_which_epoch_is_saved_and_how_to_resume(voc_dataset, tmp_path):
    """SIGINT to a real `trainer train` process: exit 130, the saved epoch and the command that resumes it."""
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes,
                              train={"epochs": 200, "eval_interval": 200})
    last = tmp_path / "runs" / "synthetic" / "last.pth"
    # SIGINT as a terminal delivers it: a test run started in the background (nohup, `make test &`) has SIGINT
    # ignored, which its children inherit, and Python then never raises KeyboardInterrupt.
    process = subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", str(config)], cwd=Path(__file__).parents[2],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 120
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.is_file(), "no epoch saved within 120 s"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    epoch = read_checkpoint(last).epoch
    assert f"training interrupted: {last} holds epoch {epoch} of 200" in stderr
    command = f"trainer train {shlex.quote(str(config))} --resume"
    assert f"resume with: {command}" in stderr
    resumed = runner.invoke(app, [*shlex.split(command)[1:], "--stop-after-epochs", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert read_checkpoint(last).epoch == epoch + 1


def test_ctrl_c_before_the_first_epoch_is_saved(voc_dataset, tmp_path, monkeypatch):
    def interrupted(training, epoch):
        raise KeyboardInterrupt

    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes)
    monkeypatch.setattr("trainer.train.train_one_epoch", interrupted)
    result = runner.invoke(app, ["train", str(config)])
    assert result.exit_code == 130
    assert "training interrupted before its first epoch was saved: nothing to resume" in result.output
    assert result.output.rstrip().endswith(f"start again with: trainer train {config}")


