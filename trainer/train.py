"""Train YOLOX on an experiment: `train(exp) -> TrainResult`, written as JSON in the run folder.

    train(exp)
      init_process      device, DDP process group, seeds
      start_fresh       or checkpoint_to_resume (trainer.runs): the run folder
      setup             splits, model, optimizer, data loader, schedule, AMP scaler, EMA
      resume_from       a checkpoint's weights, optimizer, scaler, EMA, RNG and progress
      per epoch:
        train_one_epoch
        validation_metrics (trainer.evaluate), every eval_interval epochs and at the last
        save_epoch        last.pth, and best.pth when this epoch is the best validated

Resuming (`resume=True`) reloads last.pth and continues at the saved epoch
and iteration, so the learning-rate schedule, the no-aug tail and the EMA
pick up where they stopped (YOLOX issue #506: AP collapses after a resume
that restarts the schedule). The run folder's files are listed in trainer.runs.

Under torchrun (DDP, WORLD_SIZE > 1) every rank trains its DistributedSampler
share with batch_size // world_size images per step, and logs its schedule
(iterations, learning rate and a fingerprint of its weights per epoch, logger
trainer.train.ranks); only rank 0 logs the rest, validates, shows a progress
bar and writes the run folder. Its validation is broadcast so that every rank
keeps the same progress, and the ranks meet at a barrier after each epoch's
checkpoint is written. A resume restores rank 0's saved RNG state on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from trainer import __version__
from trainer import yolox_adapter as yx
from trainer.checkpoint import Checkpoint, RngState, save_checkpoint
from trainer.config import Experiment
from trainer.datasets import load_split
from trainer.datasets.check import coverage_problems, split_source
from trainer.datasets.records import DatasetError, DatasetSplit
from trainer.device import pick_device
from trainer.evaluate import validation_metrics
from trainer.runs import BEST, LAST, MetricsLog, checkpoint_to_resume, start_fresh

log = logging.getLogger(__name__)
# Each rank's schedule, one line per epoch: the only INFO lines a rank other than 0 writes.
rank_log = logging.getLogger(f"{__name__}.ranks")


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    epochs: int
    best_epoch: int
    best_val_map50: float
    last_checkpoint: str
    best_checkpoint: str
    seconds: float
    dataset_hash: str
    trainer_version: str = __version__


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `train`. `epoch` epochs of `epochs` are saved in `last_checkpoint`; 0: nothing to resume."""

    def __init__(self, last_checkpoint: Path, epoch: int, epochs: int):
        super().__init__(last_checkpoint, epoch, epochs)
        self.last_checkpoint, self.epoch, self.epochs = last_checkpoint, epoch, epochs

    def __str__(self) -> str:
        if self.epoch == 0:
            return "training interrupted before its first epoch was saved: nothing to resume"
        return f"training interrupted: {self.last_checkpoint} holds epoch {self.epoch} of {self.epochs}"


@dataclass(frozen=True)
class Process:
    """This process's place in a (possibly DDP) run."""

    device: torch.device
    distributed: bool
    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Only the main process validates and writes the run folder."""
        return self.rank == 0


@dataclass
class Training:
    """Everything one epoch of training reads and updates."""

    exp: Experiment
    process: Process
    train_split: DatasetSplit
    val_split: DatasetSplit
    dataset_hash: str  # of the train split, recorded in every checkpoint
    model: torch.nn.Module  # DistributedDataParallel-wrapped under DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    use_amp: bool
    ema: yx.ModelEMA | None
    dataset: yx.MosaicDetection
    sampler: DistributedSampler | RandomSampler
    loader: DataLoader
    scheduler: yx.LRScheduler

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation, best.pth and export use: the EMA weights, or the trained ones without EMA."""
        return self.ema.ema if self.ema is not None else yx.unwrap(self.model)


@dataclass(frozen=True)
class Progress:
    """Where a run stands: epochs done and the best validation so far (-1.0 and epoch 0 before any)."""

    epoch: int = 0
    best_val_map50: float = -1.0
    best_epoch: int = 0

    def after_epoch(self, val: dict[str, float]) -> Progress:
        """One more epoch done, validated with `val` (empty: not validated); ties go to the later epoch."""
        epoch = self.epoch + 1
        if val and val["voc_map50"] >= self.best_val_map50:  # the later weights are averaged over longer
            return Progress(epoch, val["voc_map50"], epoch)
        return replace(self, epoch=epoch)


@dataclass(frozen=True)
class EpochStats:
    lr: float  # the learning rate of the epoch's last iteration
    losses: dict[str, float]  # mean of each of yx.LOSS_KEYS over the epoch's iterations


def train(
    exp: Experiment, resume: bool = False, stop_after_epochs: int | None = None, overwrite: bool = False
) -> TrainResult:
    """Train `exp`; return and write its TrainResult. DDP when started by torchrun with WORLD_SIZE > 1.

    resume continues the run folder's last.pth (trainer.runs.checkpoint_to_resume
    refuses one trained with other settings). Without it the run is fresh:
    a folder that already holds checkpoints is refused unless `overwrite`,
    which deletes the earlier run's files (trainer.runs.start_fresh).
    stop_after_epochs ends this call after that many epochs (the schedule is
    still the experiment's): time-boxed training, continued with resume=True.
    Ctrl-C raises TrainingInterrupted, which says which epoch is saved.
    """
    if resume and overwrite:
        raise ValueError("--resume continues the run folder's run, --overwrite deletes it: choose one")
    started = time.time()
    process = init_process(exp)
    run_dir = exp.run_dir
    checkpoint = checkpoint_to_resume(exp) if resume else None
    if checkpoint is None:
        start_fresh(run_dir, overwrite, delete=process.main)
    if process.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "experiment.json").write_text(exp.model_dump_json(indent=2))

    saved_epoch = checkpoint.epoch if checkpoint is not None else 0  # what last.pth holds, for TrainingInterrupted
    try:
        training = setup(exp, process, fine_tune=checkpoint is None)
        progress = resume_from(training, checkpoint) if checkpoint is not None else Progress()
        if process.distributed:
            device_ids = [process.device] if process.device.type == "cuda" else None
            training.model = torch.nn.parallel.DistributedDataParallel(training.model, device_ids=device_ids)
        metrics = MetricsLog(run_dir, append=checkpoint is not None) if process.main else None
        end_epoch = exp.train.epochs if stop_after_epochs is None else min(exp.train.epochs, progress.epoch + stop_after_epochs)
        for epoch in range(progress.epoch, end_epoch):
            epoch_started = time.time()
            stats = train_one_epoch(training, epoch)
            val = {}
            if (epoch + 1) % exp.train.eval_interval == 0 or epoch + 1 == exp.train.epochs:
                if process.main:
                    val = validation_metrics(training.eval_model, training.val_split, exp.model.input_hw, process.device)
                val = _from_main(process, val)
            progress = progress.after_epoch(val)
            if process.main:
                save_epoch(training, progress, val, run_dir)
            if process.distributed:
                torch.distributed.barrier()  # last.pth is complete before any rank goes on (or returns)
            saved_epoch = progress.epoch
            if process.main:
                _report_epoch(metrics, exp, progress.epoch, stats, val, time.time() - epoch_started)
    except KeyboardInterrupt as exc:
        raise TrainingInterrupted(run_dir / LAST, saved_epoch, exp.train.epochs) from exc
    finally:
        if process.distributed:
            torch.distributed.destroy_process_group()

    last_path, best_path = run_dir / LAST, run_dir / BEST
    if process.main and not best_path.is_file() and last_path.is_file():
        shutil.copyfile(last_path, best_path)  # never validated (no eval epoch ran): the last weights stand in
    result = TrainResult(
        run_dir=str(run_dir), epochs=end_epoch, best_epoch=progress.best_epoch,
        best_val_map50=progress.best_val_map50, last_checkpoint=str(last_path), best_checkpoint=str(best_path),
        seconds=round(time.time() - started, 1), dataset_hash=training.dataset_hash,
    )
    if process.main:
        (run_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def init_process(exp: Experiment) -> Process:
    """The device, the DDP process group when torchrun started WORLD_SIZE > 1 processes, and the seeds (seed + rank)."""
    device = pick_device(exp.train.device)
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    if rank != 0:  # rank 0 speaks for the run; the others only log their schedule and errors
        logging.getLogger("trainer").setLevel(logging.ERROR)
        rank_log.setLevel(logging.INFO)
    yx.seed_everything(exp.train.seed + rank)
    return Process(device, distributed, rank, world_size)


def _from_main(process: Process, value: dict[str, float]) -> dict[str, float]:
    """Rank 0's `value` on every rank (itself when not distributed): the ranks wait here for rank 0's validation."""
    if not process.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def setup(exp: Experiment, process: Process, fine_tune: bool) -> Training:
    """The splits, the model (from `model.pretrained` when fine_tune), optimizer, loader, schedule, scaler and EMA.

    The order is part of the run's reproducibility: the model's initialisation
    draws from the torch RNG that init_process seeded.
    """
    train_split = load_split(exp, "train")
    val_split = load_split(exp, "val")
    refuse_flawed(exp, train_split, val_split)
    for problem in train_split.problems:
        log.warning("%s", problem)
    log.info(
        "train: %d images (%d background), val: %d images, classes: %s",
        len(train_split), train_split.num_background, len(val_split), ", ".join(exp.classes),
    )
    device = process.device
    model = yx.build_model(exp.model.architecture, len(exp.classes))
    if fine_tune and exp.model.pretrained is not None:
        yx.load_pretrained(model, exp.model.pretrained)
    model.to(device)
    optimizer = yx.build_optimizer(exp, model)

    dataset = yx.build_train_dataset(exp, train_split)
    per_process_batch = max(1, exp.train.batch_size // process.world_size)
    sampler = DistributedSampler(dataset, seed=exp.train.seed) if process.distributed else RandomSampler(dataset)
    loader = DataLoader(
        dataset, batch_size=per_process_batch, sampler=sampler, num_workers=exp.train.workers,
        collate_fn=_collate, drop_last=len(dataset) >= per_process_batch * 2,
        worker_init_fn=yx.worker_init, persistent_workers=False, pin_memory=device.type == "cuda",
    )
    use_amp = exp.train.amp and device.type == "cuda"
    return Training(
        exp=exp, process=process, train_split=train_split, val_split=val_split,
        dataset_hash=train_split.file_list_hash(), model=model, optimizer=optimizer,
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp), use_amp=use_amp,
        ema=yx.build_ema(model) if exp.train.ema else None, dataset=dataset, sampler=sampler, loader=loader,
        scheduler=yx.build_scheduler(exp, len(loader)),
    )


def refuse_flawed(exp: Experiment, train_split: DatasetSplit, val_split: DatasetSplit) -> None:
    """Raise DatasetError for an error in the train or val split, or a train split with nothing to learn a class from.

    An image a split names but that cannot be read, a label that is not a
    class (a typo in `classes` drops all its boxes), a class with no box in
    train, a train split of background images only: a run would train or
    select its best epoch on less than the dataset says, without a word.
    """
    coverage = coverage_problems("train", split_source(exp, "train"), train_split)
    errors = [*train_split.errors, *coverage, *val_split.errors]
    if errors:
        raise DatasetError(errors, "training refused")


def resume_from(training: Training, checkpoint: Checkpoint) -> Progress:
    """Put the checkpoint's weights, optimizer, scaler, EMA and RNG state back; its progress continues."""
    training.model.load_state_dict(checkpoint.raw_model)
    training.optimizer.load_state_dict(checkpoint.optimizer)
    training.scaler.load_state_dict(checkpoint.scaler)
    if training.ema is not None:
        yx.load_ema(training.ema, checkpoint.model, checkpoint.ema_updates)
    checkpoint.rng.restore()
    log.info("resumed %s at epoch %d (iteration %d)", training.exp.run_dir / LAST, checkpoint.epoch, checkpoint.iteration)
    return Progress(checkpoint.epoch, checkpoint.best_val_map50, checkpoint.best_epoch)


def train_one_epoch(training: Training, epoch: int) -> EpochStats:
    """One pass over the training data (epoch counted from 0), the learning rate set per iteration.

    Raises FloatingPointError when the loss is not finite.
    """
    exp, model, device = training.exp, training.model, training.process.device
    if epoch >= exp.train.epochs - exp.train.no_aug_epochs:
        yx.set_no_aug(model, training.dataset)
    if training.process.distributed:
        training.sampler.set_epoch(epoch)
    model.train()
    iters_per_epoch = len(training.loader)
    sums = dict.fromkeys(yx.LOSS_KEYS, 0.0)
    lr = 0.0
    bar = tqdm(training.loader, desc=f"epoch {epoch + 1}/{exp.train.epochs}", disable=not training.process.main,
               leave=False, dynamic_ncols=True)
    for i, (images, targets) in enumerate(bar):
        lr = training.scheduler.update_lr(epoch * iters_per_epoch + i + 1)
        for group in training.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True).float()
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=training.use_amp):
            losses = model(images, targets)
        loss = losses["total_loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch + 1} iteration {i + 1}: loss is {loss.item()}; lower lr_per_image")
        training.optimizer.zero_grad(set_to_none=True)
        training.scaler.scale(loss).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        if training.ema is not None:
            training.ema.update(model)
        for key in yx.LOSS_KEYS:
            value = losses[key]
            sums[key] += float(value.item() if torch.is_tensor(value) else value)
        bar.set_postfix({k.replace("_loss", ""): f"{sums[k] / (i + 1):.3f}" for k in yx.LOSS_KEYS} | {"lr": f"{lr:.2e}"})
    first = epoch * iters_per_epoch + 1
    rank_log.info(
        "rank %d/%d epoch %d: iterations %d-%d, lr %.8e, weights %s", training.process.rank,
        training.process.world_size, epoch + 1, first, first + iters_per_epoch - 1, lr, weights_fingerprint(model),
    )
    return EpochStats(lr, {key: sums[key] / max(iters_per_epoch, 1) for key in yx.LOSS_KEYS})


def weights_fingerprint(model: torch.nn.Module) -> str:
    """The sum of the absolute values of the trained parameters, in float64: equal on every DDP rank while the
    ranks stay in step (DDP broadcasts the weights once, then only averages gradients)."""
    with torch.no_grad():
        return f"{sum(p.detach().double().abs().sum().item() for p in yx.unwrap(model).parameters()):.12e}"


def save_epoch(training: Training, progress: Progress, val: dict[str, float], run_dir: Path) -> None:
    """Write last.pth, and best.pth when this epoch is validated and the best so far."""
    checkpoint = Checkpoint(
        model=training.eval_model.state_dict(),
        raw_model=yx.unwrap(training.model).state_dict(),
        optimizer=training.optimizer.state_dict(),
        scaler=training.scaler.state_dict(),
        ema_updates=training.ema.updates if training.ema is not None else 0,
        epoch=progress.epoch,
        iteration=progress.epoch * len(training.loader),
        best_val_map50=progress.best_val_map50,
        best_epoch=progress.best_epoch,
        val_metrics=val,
        experiment=training.exp.model_dump(mode="json"),
        dataset_hash=training.dataset_hash,
        trainer_version=__version__,
        rng=RngState.capture(),
    )
    save_checkpoint(run_dir / LAST, checkpoint)
    written = [LAST]
    if val and progress.best_epoch == progress.epoch:
        save_checkpoint(run_dir / BEST, checkpoint)
        written.append(BEST)
    log.info("rank %d wrote %s (epoch %d)", training.process.rank, " and ".join(written), progress.epoch)


def _report_epoch(
    metrics: MetricsLog, exp: Experiment, epoch: int, stats: EpochStats, val: dict[str, float], seconds: float
) -> None:
    """A metrics.csv row and one line on the terminal (epoch counted from 1)."""
    metrics.add(epoch, stats.lr, stats.losses, val, seconds)
    summary = " ".join(f"{k.replace('_loss', '')}={stats.losses[k]:.3f}" for k in yx.LOSS_KEYS)
    val_text = f" val mAP50={val['voc_map50']:.4f} mAP50:95={val['voc_map50_95']:.4f}" if val else ""
    tqdm.write(f"epoch {epoch}/{exp.train.epochs} {summary} lr={stats.lr:.2e}{val_text} ({seconds:.0f}s)")


def _collate(batch):
    """YOLOX samples (image float32 [3, H, W], target [max_labels, 5], ...) -> two stacked tensors."""
    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    targets = torch.from_numpy(np.stack([b[1] for b in batch]))
    return images, targets
