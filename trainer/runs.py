"""The run folder, output_dir/name/: what a run writes there, how a fresh run starts and a resume continues.

    experiment.json       the validated experiment
    last.pth, best.pth    checkpoints (trainer.checkpoint; best by val VOC mAP@0.5)
    metrics.csv           one row per epoch: lr, losses, val metrics when validated, seconds
    curves.png            losses and val AP over epochs
    train_result.json     the TrainResult
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from trainer.checkpoint import Checkpoint, read_checkpoint
from trainer.config import Experiment
from trainer.evaluate import VAL_KEYS
from trainer.yolox_adapter import LOSS_KEYS

log = logging.getLogger(__name__)

LAST, BEST = "last.pth", "best.pth"


def checkpoint_to_resume(exp: Experiment) -> Checkpoint:
    """last.pth of the experiment's run folder; FileNotFoundError without one."""
    path = exp.run_dir / LAST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume from")
    return read_checkpoint(path)


class MetricsLog:
    """metrics.csv, one row per epoch, and curves.png drawn from it."""

    COLUMNS = ("epoch", "lr", *LOSS_KEYS, *VAL_KEYS, "seconds")

    def __init__(self, run_dir: Path, append: bool):
        """Appends to an existing metrics.csv when `append` (a resume), else starts it with its header."""
        self.path = run_dir / "metrics.csv"
        self.curves_path = run_dir / "curves.png"
        if not append or not self.path.is_file():
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.COLUMNS)

    def add(self, epoch: int, lr: float, losses: dict[str, float], val: dict[str, float], seconds: float) -> None:
        """One row (epoch counted from 1); the val columns stay empty when `val` is; curves redrawn after validation."""
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow(
                [epoch, f"{lr:.6g}", *(f"{losses[k]:.5f}" for k in LOSS_KEYS),
                 *(f"{val[k]:.5f}" if val else "" for k in VAL_KEYS), f"{seconds:.1f}"]
            )
        if val:
            plot_curves(self.path, self.curves_path)


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss terms (log scale) and val AP over epochs, side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    figure = Figure(figsize=(11, 4))
    ax_loss, ax_ap = figure.subplots(1, 2)
    for key in LOSS_KEYS:
        ax_loss.plot(epochs, [float(r[key]) for r in rows], label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training losses", yscale="log")
    ax_loss.legend()
    for key in ("voc_map50", "voc_map50_95"):
        points = [(int(r["epoch"]), float(r[key])) for r in rows if r[key]]
        if points:
            ax_ap.plot(*zip(*points), marker="o", label=key)
    ax_ap.set(xlabel="epoch", ylabel="AP", title="validation", ylim=(0, 1))
    ax_ap.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
