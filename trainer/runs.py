"""The run folder, output_dir/name/: what a run writes there, how a fresh run starts and a resume continues.

    experiment.json       the validated experiment
    last.pth, best.pth    checkpoints (trainer.checkpoint; best by val VOC mAP@0.5)
    metrics.csv           one row per epoch: lr, losses, val metrics when validated, seconds
    curves.png            losses and val AP over epochs
    train_result.json     the TrainResult

A fresh run never shares the folder with an earlier run's files (`start_fresh`),
and a resume continues only the experiment it was started with (`checkpoint_to_resume`).
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
RUN_FILES = ("experiment.json", LAST, BEST, "metrics.csv", "curves.png", "train_result.json")
# Settings a resume may change (dotted paths; a trailing dot is a whole section): they say where and how fast
# the run goes, or what export writes, not which schedule, data or model it trains. A new `workers` count or
# device still changes the random augmentation draws or the arithmetic, so the run is no longer bit-for-bit
# the uninterrupted one.
RESUMABLE_CHANGES = ("train.workers", "train.device", "train.eval_interval", "export.", "output_dir")


def start_fresh(run_dir: Path, overwrite: bool, delete: bool = True) -> None:
    """Make `run_dir` ready for a new run, so that nothing of an earlier run passes for this one's.

    A folder holding a checkpoint (last.pth or best.pth) is refused with
    FileExistsError naming it, unless `overwrite`: a new run that stops before
    its first validation would otherwise leave the earlier best.pth in place,
    and export would ship the earlier model. Otherwise the earlier run's
    RUN_FILES are deleted (when `delete`: only DDP rank 0 deletes); other files
    in the folder are left alone.
    """
    checkpoints = [name for name in (LAST, BEST) if (run_dir / name).is_file()]
    if checkpoints and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(checkpoints)}): continue it with --resume, "
            "or start again with --overwrite (deletes its checkpoints, metrics.csv, curves.png and train_result.json)"
        )
    stale = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    if stale and delete:
        log.info("new run in %s: deleting the earlier run's %s", run_dir, ", ".join(p.name for p in stale))
        for path in stale:
            path.unlink()


def checkpoint_to_resume(exp: Experiment) -> Checkpoint:
    """last.pth of the experiment's run folder, provided it was trained with the same experiment.

    Raises FileNotFoundError without last.pth, and ValueError naming every
    setting that differs from the one the run was started with (but those in
    RESUMABLE_CHANGES): resuming under another schedule, model or dataset
    would silently train something that is neither run.
    """
    path = exp.run_dir / LAST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume from")
    checkpoint = read_checkpoint(path)
    changes = changed_settings(checkpoint.trained_experiment(path), exp)
    if changes:
        raise ValueError(
            f"{path} was trained with other settings: {'; '.join(changes)}. --resume continues only the "
            "experiment it started with: restore these settings, or start a new run (another name, or --overwrite)"
        )
    return checkpoint


def changed_settings(trained: Experiment, current: Experiment) -> list[str]:
    """`section.field: old -> new` for each setting that differs, but those in RESUMABLE_CHANGES."""
    old, new = _flatten(trained.model_dump(mode="json")), _flatten(current.model_dump(mode="json"))
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not any(key == allowed or key.startswith(allowed) for allowed in RESUMABLE_CHANGES)
    ]


def _flatten(value: object, path: tuple[str, ...] = ()) -> dict[str, object]:
    """{"train": {"epochs": 3}} -> {"train.epochs": 3}; lists stay values."""
    if isinstance(value, dict):
        return {key: item for name, child in value.items() for key, item in _flatten(child, (*path, name)).items()}
    return {".".join(path): value}


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
