"""Train YOLOX on an experiment: `train(exp) -> TrainResult`, written as JSON in the run folder.

Run folder (output_dir/name/):
    last.pth, best.pth    checkpoints (best by val VOC mAP@0.5)
    metrics.csv           one row per epoch: losses, lr, val metrics when evaluated
    curves.png            losses and val AP over epochs
    train_result.json     the TrainResult
    experiment.json       the validated experiment

Resuming (`resume=True`) reloads last.pth and continues at the saved epoch
and iteration, so the learning-rate schedule, the no-aug tail and the EMA
pick up where they stopped (YOLOX issue #506: AP collapses after a resume
that restarts the schedule).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from trainer import __version__
from trainer.checkpoint import read_checkpoint
from trainer.config import Experiment
from trainer.datasets import load_split
from trainer.datasets.records import DatasetSplit
from trainer import yolox_adapter as yx

log = logging.getLogger(__name__)

LOSS_KEYS = ("total_loss", "iou_loss", "conf_loss", "cls_loss", "l1_loss")


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


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _collate(batch):
    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    targets = torch.from_numpy(np.stack([b[1] for b in batch]))
    return images, targets


def evaluate_model(model, split: DatasetSplit, input_hw, device) -> dict:
    """VOC mAP of a torch model on a split (low confidence threshold, as for any mAP)."""
    from trainer.detect import torch_detector
    from trainer.evaluate import detect_split
    from trainer.metrics import voc_metrics

    detector = torch_detector(model, input_hw, split.class_names, str(device))
    metrics = voc_metrics(split, detect_split(detector, split, conf_threshold=0.001, iou_threshold=0.65))
    return {k: metrics[k] for k in ("voc_map50", "voc07_map50", "voc_map50_95")}


def _rng_state() -> dict:
    """Every random state the data pipeline draws from, so that a resumed run replays the same batches.

    Tensors, ints and tuples only, so that `torch.load(weights_only=True)` still reads the checkpoint.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint


def train(exp: Experiment, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
    """Train `exp`; return and write its TrainResult. DDP when started by torchrun with WORLD_SIZE > 1.

    stop_after_epochs ends this call after that many epochs (the schedule is
    still the experiment's): time-boxed training, continued with resume=True.
    """
    started = time.time()
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    device = pick_device(exp.train.device)
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank = torch.distributed.get_rank() if distributed else 0
    main_process = rank == 0
    yx.seed_everything(exp.train.seed + rank)

    run_dir = exp.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.json").write_text(exp.model_dump_json(indent=2))

    train_split = load_split(exp, "train")
    val_split = load_split(exp, "val")
    for problem in train_split.problems:
        log.warning("%s", problem)
    log.info(
        "train: %d images (%d background), val: %d images, classes: %s",
        len(train_split), train_split.num_background, len(val_split), ", ".join(exp.classes),
    )

    model = yx.build_model(exp.model.architecture, len(exp.classes))
    if exp.model.pretrained is not None and not resume:
        yx.load_pretrained(model, exp.model.pretrained)
    model.to(device)
    optimizer = yx.build_optimizer(exp, model)

    dataset = yx.build_train_dataset(exp, train_split)
    world = torch.distributed.get_world_size() if distributed else 1
    per_process_batch = max(1, exp.train.batch_size // world)
    sampler = DistributedSampler(dataset, seed=exp.train.seed) if distributed else RandomSampler(dataset)
    loader = DataLoader(
        dataset, batch_size=per_process_batch, sampler=sampler, num_workers=exp.train.workers,
        collate_fn=_collate, drop_last=len(dataset) >= per_process_batch * 2,
        worker_init_fn=yx.worker_init, persistent_workers=False, pin_memory=device.type == "cuda",
    )
    iters_per_epoch = len(loader)
    scheduler = yx.build_scheduler(exp, iters_per_epoch)
    use_amp = exp.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, best_map, best_epoch = 0, -1.0, 0
    ema_updates = 0
    last_path, best_path = run_dir / "last.pth", run_dir / "best.pth"
    if resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"{last_path}: nothing to resume from")
        state = read_checkpoint(last_path)
        model.load_state_dict(state["raw_model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_map, best_epoch = state["epoch"], state["best_val_map50"], state["best_epoch"]
        ema_updates = state["ema_updates"]
        _set_rng_state(state["rng"])
        log.info("resumed %s at epoch %d (iteration %d)", last_path, start_epoch, start_epoch * iters_per_epoch)
    ema = yx.build_ema(model, updates=ema_updates) if exp.train.ema else None
    if resume and ema is not None:
        ema.ema.load_state_dict(state["model"])
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    csv_path = run_dir / "metrics.csv"
    fields = ["epoch", "lr", *LOSS_KEYS, "voc_map50", "voc07_map50", "voc_map50_95", "seconds"]
    if not resume or not csv_path.is_file():
        with open(csv_path, "w", newline="") as handle:
            csv.writer(handle).writerow(fields)

    end_epoch = exp.train.epochs if stop_after_epochs is None else min(exp.train.epochs, start_epoch + stop_after_epochs)
    for epoch in range(start_epoch, end_epoch):
        epoch_started = time.time()
        if epoch >= exp.train.epochs - exp.train.no_aug_epochs:
            yx.set_no_aug(model, dataset)
        if distributed:
            sampler.set_epoch(epoch)
        model.train()
        sums = dict.fromkeys(LOSS_KEYS, 0.0)
        lr = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{exp.train.epochs}", disable=not main_process, leave=False, dynamic_ncols=True)
        for i, (images, targets) in enumerate(bar):
            iteration = epoch * iters_per_epoch + i + 1
            lr = scheduler.update_lr(iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True).float()
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, targets)
            loss = losses["total_loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch + 1} iteration {i + 1}: loss is {loss.item()}; lower lr_per_image")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            for key in LOSS_KEYS:
                value = losses[key]
                sums[key] += float(value.item() if torch.is_tensor(value) else value)
            bar.set_postfix({k.replace("_loss", ""): f"{sums[k] / (i + 1):.3f}" for k in LOSS_KEYS} | {"lr": f"{lr:.2e}"})
        means = {k: sums[k] / max(iters_per_epoch, 1) for k in LOSS_KEYS}
        eval_model = ema.ema if ema is not None else yx.unwrap(model)
        val = {}
        last_epoch = epoch + 1 == exp.train.epochs
        if main_process and ((epoch + 1) % exp.train.eval_interval == 0 or last_epoch):
            val = evaluate_model(eval_model, val_split, exp.model.input_hw, device)
            yx.unwrap(model).head.decode_in_inference = True
            if val["voc_map50"] >= best_map:  # ties go to the later (longer-averaged) weights
                best_map, best_epoch = val["voc_map50"], epoch + 1
        if main_process:
            state = {
                "model": eval_model.state_dict(),
                "raw_model": yx.unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "ema_updates": ema.updates if ema is not None else 0,
                "epoch": epoch + 1,
                "iteration": (epoch + 1) * iters_per_epoch,
                "best_val_map50": best_map,
                "best_epoch": best_epoch,
                "experiment": exp.model_dump(mode="json"),
                "dataset_hash": train_split.file_list_hash(),
                "val_metrics": val,
                "trainer_version": __version__,
                "rng": _rng_state(),
            }
            _save(last_path, state)
            if val and best_epoch == epoch + 1:
                _save(best_path, state)
            seconds = time.time() - epoch_started
            with open(csv_path, "a", newline="") as handle:
                csv.writer(handle).writerow(
                    [epoch + 1, f"{lr:.6g}", *(f"{means[k]:.5f}" for k in LOSS_KEYS),
                     *(f"{val[k]:.5f}" if val else "" for k in ("voc_map50", "voc07_map50", "voc_map50_95")), f"{seconds:.1f}"]
                )
            summary = " ".join(f"{k.replace('_loss', '')}={means[k]:.3f}" for k in LOSS_KEYS)
            val_text = f" val mAP50={val['voc_map50']:.4f} mAP50:95={val['voc_map50_95']:.4f}" if val else ""
            tqdm.write(f"epoch {epoch + 1}/{exp.train.epochs} {summary} lr={lr:.2e}{val_text} ({seconds:.0f}s)")
            if val:
                plot_curves(csv_path, run_dir / "curves.png")
    if distributed:
        torch.distributed.destroy_process_group()
    if not best_path.is_file() and last_path.is_file():
        shutil.copyfile(last_path, best_path)  # never validated (no eval epoch ran): the last weights stand in
    result = TrainResult(
        run_dir=str(run_dir), epochs=end_epoch, best_epoch=best_epoch,
        best_val_map50=best_map, last_checkpoint=str(last_path), best_checkpoint=str(best_path),
        seconds=round(time.time() - started, 1), dataset_hash=train_split.file_list_hash(),
    )
    if main_process:
        (run_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss terms and val AP over epochs, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
