"""trainer.runs: a fresh run's folder, what a resume may change, metrics.csv and curves.png."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import pytest

from trainer.config import Experiment
from trainer.runs import RUN_FILES, MetricsLog, changed_settings, checkpoint_to_resume, start_fresh

LOSSES = {"total_loss": 9.0, "iou_loss": 4.0, "conf_loss": 3.0, "cls_loss": 1.5, "l1_loss": 0.5}
VAL = {"voc_map50": 0.5, "voc07_map50": 0.45, "voc_map50_95": 0.25}


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_metrics_log_rows_and_curves(tmp_path: Path) -> None:
    metrics = MetricsLog(tmp_path, append=False)
    metrics.add(1, 0.01, LOSSES, {}, 1.25)
    assert not (tmp_path / "curves.png").exists()  # drawn only once there is a validation to show
    metrics.add(2, 0.005, LOSSES, VAL, 2.0)
    assert rows(tmp_path) == [
        {"epoch": "1", "lr": "0.01", "total_loss": "9.00000", "iou_loss": "4.00000", "conf_loss": "3.00000",
         "cls_loss": "1.50000", "l1_loss": "0.50000", "voc_map50": "", "voc07_map50": "", "voc_map50_95": "",
         "seconds": "1.2"},
        {"epoch": "2", "lr": "0.005", "total_loss": "9.00000", "iou_loss": "4.00000", "conf_loss": "3.00000",
         "cls_loss": "1.50000", "l1_loss": "0.50000", "voc_map50": "0.50000", "voc07_map50": "0.45000",
         "voc_map50_95": "0.25000", "seconds": "2.0"},
    ]
    png = cv2.imread(str(tmp_path / "curves.png"))
    assert png is not None and png.shape[:2] == (400, 1100)


@pytest.mark.parametrize(("append", "expected_epochs"), [(True, ["1", "2"]), (False, ["2"])], ids=["resume", "fresh"])
def test_metrics_log_appends_only_on_resume(tmp_path: Path, append: bool, expected_epochs: list[str]) -> None:
    MetricsLog(tmp_path, append=False).add(1, 0.01, LOSSES, {}, 1.0)
    MetricsLog(tmp_path, append=append).add(2, 0.01, LOSSES, {}, 1.0)
    assert [r["epoch"] for r in rows(tmp_path)] == expected_epochs


def test_resume_needs_last_pth(tmp_path: Path) -> None:
    exp = Experiment.model_validate({"name": "run", "classes": ["a"], "output_dir": str(tmp_path),
                                     "dataset": {"name": "d", "format": "voc", "root": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match=r"run/last.pth: nothing to resume from"):
        checkpoint_to_resume(exp)


def experiment(tmp_path: Path, **sections) -> Experiment:
    raw = {"name": "run", "classes": ["a", "b"], "output_dir": str(tmp_path),
           "dataset": {"name": "d", "format": "voc", "root": str(tmp_path)}}
    for section, values in sections.items():
        raw[section] = raw.get(section, {}) | values if isinstance(values, dict) else values
    return Experiment.model_validate(raw)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"train": {"epochs": 200, "lr_per_image": 0.001}},
         ["train.epochs: 100 -> 200", "train.lr_per_image: 0.00015625 -> 0.001"]),
        ({"augment": {"mosaic_scale": [0.1, 2.0]}, "classes": ["a", "c"]},
         ["augment.mosaic_scale: [0.5, 1.5] -> [0.1, 2.0]", "classes: ['a', 'b'] -> ['a', 'c']"]),
        ({"dataset": {"root": "/elsewhere"}}, [r"dataset.root: '{tmp}' -> '/elsewhere'"]),
        ({"train": {"workers": 8, "device": "cpu", "eval_interval": 1}, "export": {"conf_threshold": 0.5}}, []),
        ({"output_dir": "/moved"}, []),
    ],
    ids=["same", "schedule", "augment-and-classes", "dataset", "machine-and-export", "moved"],
)
def test_changed_settings(tmp_path: Path, changes: dict, expected: list[str]) -> None:
    """Everything that decides what is trained is named; where it runs and what export writes may change."""
    found = changed_settings(experiment(tmp_path), experiment(tmp_path, **changes))
    assert found == [line.replace("{tmp}", str(tmp_path)) for line in expected]


@pytest.mark.parametrize(
    ("files", "overwrite", "error"),
    [
        ((), False, None),
        (("metrics.csv", "experiment.json", "curves.png", "train_result.json"), False, None),  # no checkpoint
        (("best.pth",), False, r"{dir} already holds a run \(best.pth\): continue it with --resume, or start again "
                                r"with --overwrite"),
        (("last.pth", "best.pth", "metrics.csv"), False, r"\(last.pth, best.pth\)"),
        (("last.pth", "best.pth", "metrics.csv", "curves.png", "train_result.json", "experiment.json"), True, None),
    ],
    ids=["empty", "no-checkpoint", "best-only", "checkpoints", "overwrite"],
)
def test_start_fresh(tmp_path: Path, files: tuple[str, ...], overwrite: bool, error: str | None) -> None:
    """An earlier run's checkpoints are never silently kept (nor deleted without --overwrite); other files stay."""
    for name in (*files, "notes.txt"):
        (tmp_path / name).write_text(name)
    if error:
        with pytest.raises(FileExistsError, match=error.replace("{dir}", str(tmp_path))):
            start_fresh(tmp_path, overwrite)
        assert all((tmp_path / name).read_text() == name for name in files)
    else:
        start_fresh(tmp_path, overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_start_fresh_deletes_only_on_the_main_process(tmp_path: Path) -> None:
    for name in RUN_FILES:
        (tmp_path / name).write_text(name)
    start_fresh(tmp_path, overwrite=True, delete=False)
    assert all((tmp_path / name).is_file() for name in RUN_FILES)
