"""Checkpoints of `trainer train`: the typed `Checkpoint`, and the one place that writes and reads them.

On disk a checkpoint is a plain dict of the `Checkpoint` fields (tensors,
numbers, strings, lists, tuples and dicts only), so that
`torch.load(weights_only=True)` reads it and nothing in it can run code.
`Checkpoint.to_dict` and `Checkpoint.from_dict` are the only conversions;
train (save, resume), export and eval all go through `read_checkpoint`.
The keys are those the trainer has always written, so older checkpoints load.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from trainer.config import Experiment
from trainer.yolox_adapter import build_model

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class RngState:
    """Every random state the data pipeline draws from, so that a resumed run replays the same batches."""

    python: tuple  # random.getstate()
    numpy: tuple  # np.random.get_state(), its uint32 keys as an int64 tensor (weights_only has no numpy arrays)
    torch: torch.Tensor  # torch.get_rng_state(), uint8

    @classmethod
    def capture(cls) -> RngState:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
        return cls(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())

    def restore(self) -> None:
        random.setstate(self.python)
        name, keys, pos, has_gauss, cached = self.numpy
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(self.torch)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A run's state after an epoch: what eval and export run, and all that resume needs to continue exactly."""

    model: StateDict  # the weights to run: the EMA weights when train.ema, else the trained ones
    raw_model: StateDict  # the trained (non-EMA) weights, which resume continues from
    optimizer: dict  # torch.optim state_dict
    scaler: dict  # torch.amp.GradScaler state_dict
    ema_updates: int  # ModelEMA.updates: the EMA decay's warm-up position
    epoch: int  # epochs completed
    iteration: int  # optimizer steps completed: epoch * iterations per epoch
    best_val_map50: float  # best val VOC mAP@0.5 so far; -1.0 before the first validation
    best_epoch: int  # the epoch of best_val_map50; 0 before the first validation
    val_metrics: dict[str, float]  # this epoch's validation (voc_map50, ...); empty if it was not validated
    experiment: dict  # the experiment trained with, Experiment.model_dump(mode="json")
    dataset_hash: str  # DatasetSplit.file_list_hash() of the train split
    trainer_version: str
    rng: RngState  # captured at the end of the epoch

    def to_dict(self) -> dict:
        """The on-disk form: the fields by name, the RNG state as a dict."""
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        state["rng"] = {field.name: getattr(self.rng, field.name) for field in dataclasses.fields(RngState)}
        return state

    @classmethod
    def from_dict(cls, state: object, source: Path) -> Checkpoint:
        """The checkpoint of a dict read from `source`; ValueError naming what is missing."""
        names = [field.name for field in dataclasses.fields(cls)]
        if not isinstance(state, dict):
            raise ValueError(f"{source}: not a checkpoint written by `trainer train` (a {type(state).__name__}, not a dict)")
        missing = [name for name in names if name not in state]
        if missing:
            raise ValueError(f"{source}: not a checkpoint written by `trainer train` (missing {', '.join(missing)})")
        unknown = sorted(set(state) - set(names))
        if unknown:
            log.warning("%s: ignored %s, unknown to this trainer version", source, ", ".join(map(str, unknown)))
        rng = state["rng"]
        if not isinstance(rng, dict) or set(rng) != {field.name for field in dataclasses.fields(RngState)}:
            raise ValueError(f"{source}: the checkpoint's rng state is not python/numpy/torch")
        return cls(**{name: state[name] for name in names if name != "rng"}, rng=RngState(**rng))

    def trained_experiment(self, source: Path) -> Experiment:
        """The experiment trained with; settings this trainer version no longer has are dropped with a warning."""
        raw = copy.deepcopy(self.experiment)
        try:
            return Experiment.model_validate(raw)
        except ValidationError as exc:
            unknown = [err["loc"] for err in exc.errors() if err["type"] == "extra_forbidden"]
            if len(unknown) != len(exc.errors()):
                raise ValueError(f"{source}: the experiment stored in the checkpoint is not valid: {exc}") from exc
        for loc in unknown:
            parent = raw
            for part in loc[:-1]:
                parent = parent[part]
            parent.pop(loc[-1])
            log.warning("%s: dropped setting %s, unknown to this trainer version", source, ".".join(map(str, loc)))
        return Experiment.model_validate(raw)

    def load_model(self, source: Path) -> torch.nn.Module:
        """The YOLOX model with `model` (the weights to run); only the experiment's architecture and classes are read."""
        try:
            architecture, classes = self.experiment["model"]["architecture"], self.experiment["classes"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: the checkpoint's experiment has no {exc}") from exc
        model = build_model(architecture, len(classes))
        try:
            model.load_state_dict(self.model)
        except RuntimeError as exc:
            raise ValueError(f"{source}: weights do not fit a {architecture} with {len(classes)} classes: {exc}") from exc
        return model


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write atomically (temp file, then rename): a crash mid-save never leaves a truncated checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint.to_dict(), tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint written by `trainer train` at `path`; ValueError for any other file."""
    try:
        # weights_only: a checkpoint is tensors and plain values, and nothing in it should run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a bad file
        raise ValueError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    return Checkpoint.from_dict(state, path)


def resolve_checkpoint(path: Path) -> Path:
    """A run folder means its best.pth (or last.pth); a file is taken as it is."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pth", "last.pth"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: run folder has no best.pth or last.pth")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    return path
