"""Checkpoints written by `trainer train`: the one place that reads them (export, eval, resume)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from pydantic import ValidationError

from trainer.config import Experiment

log = logging.getLogger(__name__)


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


def read_checkpoint(path: Path) -> dict:
    """The dict written by trainer.train; ValueError for any other file."""
    try:
        # weights_only: a checkpoint is tensors and plain values, and nothing in it should run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a bad file
        raise ValueError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state or "experiment" not in state:
        raise ValueError(f"{path}: not a checkpoint written by `trainer train` (needs 'model' and 'experiment')")
    return state


def load_checkpoint(path: Path) -> tuple[dict, Experiment]:
    """The checkpoint dict and the full experiment it was trained with."""
    state = read_checkpoint(path)
    return state, stored_experiment(state["experiment"], path)


def stored_experiment(raw: dict, source: Path) -> Experiment:
    """The experiment saved in a checkpoint; settings this trainer version no longer has are dropped with a warning."""
    raw = copy.deepcopy(raw)
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


def model_from_state(state: dict, path: Path) -> torch.nn.Module:
    """The YOLOX model of a checkpoint dict with its (EMA) weights; only its architecture and classes are read."""
    from trainer.yolox_adapter import build_model

    try:
        architecture, classes = state["experiment"]["model"]["architecture"], state["experiment"]["classes"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a checkpoint written by `trainer train` (missing {exc})") from exc
    model = build_model(architecture, len(classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit a {architecture} with {len(classes)} classes: {exc}") from exc
    return model
