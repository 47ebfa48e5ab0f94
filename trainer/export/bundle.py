"""Checkpoint -> model bundle: `NAME.bundle/{model.onnx, weights.safetensors, bundle.json}` (DESIGN contract 1).

The same weights go out twice: as the ONNX graph (decode inside) for ONNX
Runtime and TensorRT, and as a safetensors state_dict with the architecture
fields for streamd's torch backend.

After writing the bundle, export runs it as streamd will (ONNX Runtime,
streamd's letterbox and postprocess) on the first SCORE_CHECK_IMAGES images of
the experiment's val split, and warns when no score reaches the bundle's
default conf_threshold: streamd would then report nothing at all. Then it adds
the golden frames (streamd.selftest.write_golden): the first GOLDEN_IMAGES
images of the val split and ONNX Runtime's detections on them, which the
daemon's self-test compares every backend with before READY=1.

An existing bundle, or a folder that holds any file, is not written into
unless `overwrite` (`trainer export --overwrite`): the files of the new bundle
then replace the old ones of the same names.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import torch

from streamd.model.bundle import META_FILE, Bundle, write_bundle
from streamd.selftest import GOLDEN_IMAGES, write_golden
from trainer import __version__
from trainer.checkpoint import read_checkpoint, resolve_checkpoint
from trainer.config import Experiment
from trainer.datasets import load_split
from trainer.detect import bundle_detector
from trainer.evaluate import AP_CONF_THRESHOLD, AP_IOU_THRESHOLD, detect_split
from trainer.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx
from trainer.export.weights import safetensors_bytes, yolox_fields

log = logging.getLogger(__name__)

SCORE_CHECK_IMAGES = 64


@dataclass(frozen=True)
class ExportResult:
    bundle: str
    sha256: str
    onnx_bytes: int
    epochs: int
    metrics: dict
    val_max_score: float | None  # highest detection score on the val images checked; None: split not readable here


def export_bundle(checkpoint: Path, out: Path, name: str | None = None, overwrite: bool = False) -> ExportResult:
    """Export the (EMA) weights of a checkpoint or run folder to a bundle folder `out` (see check_out)."""
    check_out(out, overwrite)
    path = resolve_checkpoint(checkpoint)
    state = read_checkpoint(path)
    exp = state.trained_experiment(path)
    val = {k: float(v) for k, v in state.val_metrics.items()}
    return export_model(
        state.load_model(path), exp, out, name=name, epochs=state.epoch, dataset_hash=state.dataset_hash,
        checkpoint=path.name, metrics={f"val_{k}": v for k, v in val.items()}, overwrite=overwrite,
    )  # fmt: skip


def export_model(
    model: torch.nn.Module,
    exp: Experiment,
    out: Path,
    *,
    name: str | None = None,
    epochs: int,
    dataset_hash: str,
    checkpoint: str,
    metrics: dict[str, float],
    overwrite: bool = False,
) -> ExportResult:
    """Write the bundle of a YOLOX `model` built for `exp` (its architecture, classes and input size) to `out`.

    export_bundle's work after reading the checkpoint; benchmarks use it for models that were never trained.
    """
    check_out(out, overwrite)
    onnx_bytes = export_onnx(model, tuple(exp.model.input_hw), opset=exp.export.opset)
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
            "dataset_hash": dataset_hash,
            "epochs": epochs,
            "trainer_version": __version__,
            "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checkpoint": checkpoint,
        },
        "metrics": dict(metrics),
        "yolox": yolox_fields(exp),
    }
    bundle: Bundle = write_bundle(out, onnx_bytes, meta, weights_bytes=safetensors_bytes(model))
    top_score = val_max_score(bundle.path, exp)
    add_golden_frames(bundle.path, exp)
    return ExportResult(str(bundle.path), bundle.sha256, len(onnx_bytes), epochs, meta["metrics"], top_score)


def val_max_score(bundle_path: Path, exp: Experiment, max_images: int = SCORE_CHECK_IMAGES) -> float | None:
    """The bundle's highest detection score over the first `max_images` images of exp's val split.

    0.0 when nothing scores AP_CONF_THRESHOLD or more. Warns when it is below the bundle's conf_threshold (exp.export's). None,
    with a warning, when the split cannot be read on this machine.
    """
    try:
        split = load_split(exp, "val")
    except (OSError, ValueError) as exc:
        log.warning("cannot check the exported model's scores on the val split: %s", exc)
        return None
    if len(split) == 0:
        log.warning("cannot check the exported model's scores: the val split has no readable image here")
        return None
    detector, _ = bundle_detector(bundle_path)
    sample = dataclasses.replace(split, records=split.records[:max_images])
    detections = detect_split(detector, sample, AP_CONF_THRESHOLD, AP_IOU_THRESHOLD)
    top_score = max((float(d.confidence.max()) for d in detections if len(d.confidence)), default=0.0)
    if top_score < exp.export.conf_threshold:
        log.warning(
            "%s: the model's highest score on %d val images is %.3f, below the bundle's conf_threshold %.2f: "
            "streamd would detect nothing. Train longer, or lower export.conf_threshold.",
            bundle_path, len(sample), top_score, exp.export.conf_threshold,
        )
    return top_score


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write a bundle into `out` when it exists and is not an empty folder, unless overwrite.

    ValueError naming the folder and what it holds.
    """
    out = Path(out)
    if overwrite or not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; name a new bundle folder")
    held = sorted(entry.name for entry in out.iterdir())
    if held:
        what = "a bundle" if META_FILE in held else f"{len(held)} files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
        raise ValueError(f"{out}: already holds {what}; pass --overwrite to replace it, or name a new folder")


def add_golden_frames(bundle_path: Path, exp: Experiment, count: int = GOLDEN_IMAGES) -> Bundle | None:
    """Add the first `count` images of exp's val split, and ONNX Runtime's detections on them, to the bundle.

    None, with a warning, when the split cannot be read on this machine (the bundle then has no golden frames
    and the daemon's self-test makes its own frames at start).
    """
    try:
        records = load_split(exp, "val").records[:count]
        images = [(record.path.name, cv2.imread(str(record.path), cv2.IMREAD_COLOR)) for record in records]
    except (OSError, ValueError) as exc:
        log.warning("%s: no golden frames: cannot read the val split: %s", bundle_path, exc)
        return None
    unread = [name for name, image in images if image is None]
    if not images or unread:
        log.warning("%s: no golden frames: val images not readable here: %s", bundle_path, unread or "none in the split")
        return None
    return write_golden(bundle_path, images, f"{exp.dataset.name}/val: the first {len(images)} images")


def add_metrics(bundle_path: Path, metrics: dict[str, float]) -> None:
    """Record test metrics in bundle.json (the ONNX file and its sha256 are unchanged)."""
    meta_path = Path(bundle_path) / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"] = {**meta.get("metrics", {}), **{k: round(float(v), 5) for k, v in metrics.items()}}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


__all__ = ["ExportResult", "add_golden_frames", "add_metrics", "check_out", "export_bundle", "export_model"]
