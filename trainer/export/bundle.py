"""Checkpoint -> model bundle: `NAME.bundle/{model.onnx, bundle.json}` (DESIGN contract 1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from streamd.model.bundle import Bundle, write_bundle
from trainer import __version__
from trainer.checkpoint import read_checkpoint, resolve_checkpoint
from trainer.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx


@dataclass(frozen=True)
class ExportResult:
    bundle: str
    sha256: str
    onnx_bytes: int
    epochs: int
    metrics: dict


def export_bundle(checkpoint: Path, out: Path, name: str | None = None) -> ExportResult:
    """Export the (EMA) weights of a checkpoint or run folder to a bundle folder `out`."""
    path = resolve_checkpoint(checkpoint)
    state = read_checkpoint(path)
    exp = state.trained_experiment(path)
    onnx_bytes = export_onnx(state.load_model(path), tuple(exp.model.input_hw), opset=exp.export.opset)
    val = {k: float(v) for k, v in state.val_metrics.items()}
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
            "dataset_hash": state.dataset_hash,
            "epochs": state.epoch,
            "trainer_version": __version__,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checkpoint": path.name,
        },
        "metrics": {f"val_{k}": v for k, v in val.items()},
    }
    bundle: Bundle = write_bundle(out, onnx_bytes, meta)
    return ExportResult(str(bundle.path), bundle.sha256, len(onnx_bytes), state.epoch, meta["metrics"])


def add_metrics(bundle_path: Path, metrics: dict[str, float]) -> None:
    """Record test metrics in bundle.json (the ONNX file and its sha256 are unchanged)."""
    meta_path = Path(bundle_path) / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {**meta.get("metrics", {}), **{k: round(float(v), 5) for k, v in metrics.items()}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


__all__ = ["ExportResult", "add_metrics", "export_bundle"]
