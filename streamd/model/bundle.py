"""The model bundle (DESIGN contract 1): `NAME.bundle/{model.onnx, bundle.json}`.

`bundle.json` says everything streamd needs to run `model.onnx` the way the
trainer ran the model: class names in label order, input size,
preprocessing, default thresholds, the sha256 of the ONNX file, and where the
model came from (dataset, epochs, trainer version, date, validation metrics).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamd.errors import BundleError

FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
META_FILE = "bundle.json"
ARCHITECTURES = ("yolox_nano", "yolox_tiny", "yolox_s", "yolox_m", "yolox_l", "yolox_x")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Preprocess(_Frozen):
    """How a frame becomes the `images` input."""

    resize: Literal["letterbox"] = Field("letterbox", description="Scale to fit, keep aspect, pad bottom/right.")
    pad_value: int = Field(114, ge=0, le=255, description="Value of the padding pixels.")
    channel_order: Literal["bgr", "rgb"] = Field("bgr", description="Channel order the model was trained on.")
    scale: float = Field(1.0, gt=0, description="Pixels are multiplied by this after mean/std.")
    mean: tuple[float, float, float] | None = Field(None, description="Per-channel mean subtracted, or none.")
    std: tuple[float, float, float] | None = Field(None, description="Per-channel std divided by, or none.")


class Thresholds(_Frozen):
    conf_threshold: float = Field(0.3, ge=0, le=1, description="Minimum objectness x class score.")
    iou_threshold: float = Field(0.45, gt=0, le=1, description="Class-aware NMS IoU threshold.")


class OnnxInfo(_Frozen):
    file: str = ONNX_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=7)
    input_name: str = "images"
    output_name: str = "output"


class Provenance(_Frozen):
    dataset: str = Field(description="Dataset name from the training config.")
    dataset_hash: str = Field(description="sha256 of the sorted training file list and class names.")
    epochs: int = Field(ge=0, description="Epochs the exported weights were trained for.")
    trainer_version: str
    created_at: str = Field(description="UTC ISO-8601 time of export.")
    checkpoint: str = Field("", description="Checkpoint file the bundle was exported from.")


class BundleMeta(_Frozen):
    """The parsed `bundle.json`."""

    format_version: int = Field(FORMAT_VERSION, ge=1, le=FORMAT_VERSION)
    name: str = Field(min_length=1)
    architecture: Literal[ARCHITECTURES]  # type: ignore[valid-type]
    class_names: tuple[str, ...] = Field(min_length=1)
    input_hw: tuple[int, int]
    preprocess: Preprocess = Preprocess()
    thresholds: Thresholds = Thresholds()
    onnx: OnnxInfo
    provenance: Provenance
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation metrics at export.")

    @field_validator("input_hw")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(v <= 0 or v % 32 for v in value):
            raise ValueError(f"input_hw must be positive multiples of 32 (YOLOX strides), got {value}")
        return value


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle on disk whose ONNX file matched its recorded checksum."""

    path: Path
    meta: BundleMeta

    @property
    def onnx_path(self) -> Path:
        return self.path / self.meta.onnx.file

    @property
    def sha256(self) -> str:
        return self.meta.onnx.sha256

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.meta.class_names


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle folder; raise BundleError naming the file and field at fault."""
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: not a model bundle folder (expected a directory with {META_FILE} and {ONNX_FILE})")
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: missing")
    try:
        raw = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta_path}: not valid JSON: {exc}") from exc
    try:
        meta = BundleMeta.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise BundleError(f"{meta_path}: {problems}") from exc
    onnx_path = path / meta.onnx.file
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path}: missing (named by {meta_path} field onnx.file)")
    if verify:
        actual = sha256_file(onnx_path)
        if actual != meta.onnx.sha256:
            raise BundleError(
                f"{onnx_path}: sha256 {actual[:12]}... does not match onnx.sha256 "
                f"{meta.onnx.sha256[:12]}... in {meta_path}; the model file was changed after export"
            )
    return Bundle(path=path, meta=meta)


def write_bundle(path: str | Path, onnx_bytes: bytes, meta_fields: dict) -> Bundle:
    """Write `model.onnx` and `bundle.json` (with the sha256 filled in) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    onnx_path = path / ONNX_FILE
    onnx_path.write_bytes(onnx_bytes)
    fields = dict(meta_fields)
    fields["onnx"] = {**fields.get("onnx", {}), "file": ONNX_FILE, "sha256": hashlib.sha256(onnx_bytes).hexdigest()}
    meta = BundleMeta.model_validate(fields)
    (path / META_FILE).write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    return Bundle(path=path, meta=meta)
