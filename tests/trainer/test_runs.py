"""trainer.runs: the run folder's metrics.csv and curves.png, and finding the checkpoint to resume."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import pytest

from trainer.config import Experiment
from trainer.runs import MetricsLog, checkpoint_to_resume

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
