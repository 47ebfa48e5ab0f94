"""Checkpoint -> model bundle: `NAME.bundle/{model.onnx, bundle.json}` (DESIGN contract 1)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from pydantic import ValidationError

from streamd.model.bundle import Bundle, write_bundle
from trainer import __version__
from trainer.config import Experiment
from trainer.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
from trainer.yolox_adapter import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    bundle: str
    sha256: str
    onnx_bytes: int
    epochs: int
    metrics: dict


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


def load_checkpoint(path: Path) -> tuple[dict, Experiment]:
    """The checkpoint dict written by trainer.train and the experiment it was trained with."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state or "experiment" not in state:
        raise ValueError(f"{path}: not a trainer checkpoint (needs 'model' and 'experiment'; was it written by `trainer train`?)")
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


def export_bundle(checkpoint: Path, out: Path, name: str | None = None) -> ExportResult:
    """Export the (EMA) weights of a checkpoint or run folder to a bundle folder `out`."""
    path = resolve_checkpoint(checkpoint)
    state, exp = load_checkpoint(path)
    model = build_model(exp.model.architecture, len(exp.classes))
    model.load_state_dict(state["model"])
    onnx_bytes = export_onnx(model, tuple(exp.model.input_hw), opset=exp.export.opset)
    val = {k: float(v) for k, v in (state.get("val_metrics") or {}).items()}
    meta = {
        "name": name or exp.name,
        "architecture": exp.model.architecture,
        "class_names": list(exp.classes),
        "input_hw": list(exp.model.input_hw),
        "preprocess": {"resize": "letterbox", "pad_value": 114, "channel_order": "bgr", "scale": 1.0},
        "thresholds": {"conf_threshold": exp.export.conf_threshold, "iou_threshold": exp.export.iou_threshold},
        "onnx": {"opset": exp.export.opset, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME},
        "provenance": {
            "dataset": exp.dataset.name,
            "dataset_hash": state.get("dataset_hash", ""),
            "epochs": int(state.get("epoch", 0)),
            "trainer_version": __version__,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checkpoint": path.name,
        },
        "metrics": {f"val_{k}": v for k, v in val.items()},
    }
    bundle: Bundle = write_bundle(out, onnx_bytes, meta)
    return ExportResult(str(bundle.path), bundle.sha256, len(onnx_bytes), int(state.get("epoch", 0)), meta["metrics"])


def add_metrics(bundle_path: Path, metrics: dict[str, float]) -> None:
    """Record test metrics in bundle.json (the ONNX file and its sha256 are unchanged)."""
    meta_path = Path(bundle_path) / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {**meta.get("metrics", {}), **{k: round(float(v), 5) for k, v in metrics.items()}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


__all__ = ["ExportResult", "add_metrics", "export_bundle", "load_checkpoint", "resolve_checkpoint", "stored_experiment"]
