"""The model bundle (DESIGN contract 1): `NAME.bundle/{model.onnx, weights.safetensors, bundle.json}`.

`bundle.json` says everything streamd needs to run `model.onnx` the way the
trainer ran the model: class names in label order, input size,
preprocessing, default thresholds, the sha256 of the ONNX file, and where the
model came from (dataset, epochs, trainer version, date, validation metrics).

Format 2 adds, optionally, what the torch backend needs: `weights.safetensors`
(the YOLOX state_dict, no pickle: a bundle is data, never code) with its
sha256 in `weights`, and in `yolox` the fields pixeltable-yolox rebuilds the
model from. A bundle without them (every format-1 bundle) still loads and runs
on ONNX Runtime and TensorRT. The new fields make a bundle format 2 because a
format-1 reader refuses unknown keys.

Format 3 adds, optionally, where a quantized bundle came from, as fields:
`provenance.source_bundle` (the fp32 bundle's name and ONNX sha256) and
`provenance.calibration` (experiment file, dataset, split, image count, the
images' fingerprint, method, target runtime), written by `trainer quantize`.
A bundle is written with the lowest format that holds its fields, so an fp32
bundle stays format 2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamd.errors import BundleError

FORMAT_VERSION = 3  # the newest; 1, 2 and 3 are read, each bundle written with the lowest that holds it
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
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


class WeightsInfo(_Frozen):
    """The torch backend's weights: YOLOX's full state_dict (batch-norm included) in one safetensors file."""

    file: str = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file; checked on every load.")
    format: Literal["safetensors"] = "safetensors"


class YoloxArch(_Frozen):
    """What pixeltable-yolox's YoloxConfig needs to rebuild the model the weights fit.

    Batch-norm eps is YOLOX's own (1e-3, set by YoloxConfig.get_model), as in training.
    """

    depth: float = Field(gt=0, le=2, description="YOLOX depth factor (nano/tiny/s 0.33 ... x 1.33).")
    width: float = Field(gt=0, le=2, description="YOLOX width factor (nano 0.25 ... x 1.25).")
    depthwise: bool = Field(description="Depthwise-separable convolutions (nano).")
    act: Literal["silu", "relu", "lrelu"] = Field(description="Activation.")
    num_classes: int = Field(ge=1, description="Classes the head scores; equals len(class_names).")
    strides: tuple[int, int, int] = Field((8, 16, 32), description="The head's output strides, finest first.")


class SourceBundle(_Frozen):
    """The bundle a quantized bundle was made from (format 3)."""

    name: str = Field(min_length=1, description="The source bundle's folder name, e.g. bccd-nano.bundle.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The source bundle's model.onnx sha256.")


class Calibration(_Frozen):
    """The data an int8 bundle's scales were calibrated on (format 3)."""

    experiment: str = Field(min_length=1, description="The experiment YAML file that named the dataset.")
    dataset: str = Field(min_length=1, description="Dataset name from the experiment.")
    split: Literal["train", "val", "test"] = Field(description="The split the images came from.")
    images: int = Field(ge=1, description="Images the calibration saw.")
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the images' names and contents, input size, preprocess.")
    method: Literal["minmax", "entropy", "percentile"] = Field(description="How activation ranges were chosen.")
    target: Literal["onnxruntime", "tensorrt"] = Field(
        description="The runtime the Q/DQ layout is for: onnxruntime (uint8 activations) or tensorrt (symmetric int8)."
    )


class Provenance(_Frozen):
    dataset: str = Field(description="Dataset name from the training config.")
    dataset_hash: str = Field(description="sha256 of the sorted training file list and class names.")
    epochs: int = Field(ge=0, description="Epochs the exported weights were trained for.")
    trainer_version: str
    created_at: str = Field(description="UTC ISO-8601 time of export.")
    checkpoint: str = Field("", description="Checkpoint file the bundle was exported from.")
    source_bundle: SourceBundle | None = Field(None, description="For a quantized bundle: the bundle it was made from.")
    calibration: Calibration | None = Field(None, description="For a quantized bundle: the data its scales came from.")

    @model_validator(mode="after")
    def _quantized_together(self) -> Provenance:
        if (self.source_bundle is None) != (self.calibration is None):
            raise ValueError("source_bundle and calibration come together: a quantized bundle names both")
        return self


class BundleMeta(_Frozen):
    """The parsed `bundle.json`."""

    format_version: int = Field(
        FORMAT_VERSION, ge=1, le=FORMAT_VERSION, description="1: ONNX only; 2: + weights; 3: + quantization provenance."
    )
    name: str = Field(min_length=1)
    architecture: Literal[ARCHITECTURES]  # type: ignore[valid-type]
    class_names: tuple[str, ...] = Field(min_length=1)
    input_hw: tuple[int, int]
    preprocess: Preprocess = Preprocess()
    thresholds: Thresholds = Thresholds()
    onnx: OnnxInfo
    provenance: Provenance
    metrics: dict[str, float] = Field(default_factory=dict, description="Validation metrics at export.")
    weights: WeightsInfo | None = Field(None, description="Weights for the torch backend (format 2); none: ONNX only.")
    yolox: YoloxArch | None = Field(None, description="The architecture the weights fit (format 2, with weights).")

    @field_validator("input_hw")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(v <= 0 or v % 32 for v in value):
            raise ValueError(f"input_hw must be positive multiples of 32 (YOLOX strides), got {value}")
        return value

    @model_validator(mode="after")
    def _weights_fit(self) -> BundleMeta:
        if (self.weights is None) != (self.yolox is None):
            raise ValueError("weights and yolox come together: the weights need the architecture they fit")
        if self.weights is not None and self.format_version < 2:
            raise ValueError("weights and yolox need format_version 2")
        if self.provenance.source_bundle is not None and self.format_version < 3:
            raise ValueError("provenance.source_bundle and provenance.calibration need format_version 3")
        if self.yolox is not None and self.yolox.num_classes != len(self.class_names):
            raise ValueError(
                f"yolox.num_classes is {self.yolox.num_classes} but class_names names {len(self.class_names)}"
            )
        return self


@dataclass(frozen=True, slots=True)
class Bundle:
    """A bundle on disk whose ONNX file matched its recorded checksum."""

    path: Path
    meta: BundleMeta

    @property
    def onnx_path(self) -> Path:
        return self.path / self.meta.onnx.file

    @property
    def weights_path(self) -> Path | None:
        """weights.safetensors for the torch backend; None for a bundle exported without it."""
        return None if self.meta.weights is None else self.path / self.meta.weights.file

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
        raw = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{meta_path}: not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}") from exc
    except (OSError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{meta_path}: not valid JSON: {exc}") from exc
    try:
        meta = BundleMeta.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(f"{meta_path}: {_problems(exc)}") from exc
    onnx_path = path / meta.onnx.file
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path}: missing (named by {meta_path} field onnx.file)")
    checked = [(onnx_path, meta.onnx.sha256, "onnx")]
    if meta.weights is not None:
        weights_path = path / meta.weights.file
        if not weights_path.is_file():
            raise BundleError(f"{weights_path}: missing (named by {meta_path} field weights.file)")
        checked.append((weights_path, meta.weights.sha256, "weights"))
    for file, expected, field in checked if verify else ():
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"{file}: sha256 {actual[:12]}... does not match {field}.sha256 "
                f"{expected[:12]}... in {meta_path}; the file was changed after export"
            )
    return Bundle(path=path, meta=meta)


def write_bundle(path: str | Path, onnx_bytes: bytes, meta_fields: dict, weights_bytes: bytes | None = None) -> Bundle:
    """Write `model.onnx`, `weights.safetensors` when given, and `bundle.json` (sha256s filled in) into `path`.

    weights_bytes needs meta_fields["yolox"], the architecture they fit.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fields = {**meta_fields, "format_version": format_for(meta_fields)}
    fields["onnx"] = {**fields.get("onnx", {}), "file": ONNX_FILE, "sha256": hashlib.sha256(onnx_bytes).hexdigest()}
    if weights_bytes is not None:
        fields["weights"] = {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights_bytes).hexdigest()}
    meta = _validate_fields(path / META_FILE, fields)
    (path / ONNX_FILE).write_bytes(onnx_bytes)
    if weights_bytes is not None:
        (path / WEIGHTS_FILE).write_bytes(weights_bytes)
    (path / META_FILE).write_text(meta_json(meta))
    return Bundle(path=path, meta=meta)


def add_weights(path: str | Path, weights_bytes: bytes, yolox: dict) -> Bundle:
    """Add weights.safetensors to an existing bundle; model.onnx and every other field stay as they are.

    For bundles exported before format 2. bundle.json becomes format 2.
    """
    bundle = load_bundle(path)
    fields = bundle.meta.model_dump(mode="json") | {
        "format_version": format_for(bundle.meta.model_dump(mode="json")),
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights_bytes).hexdigest()},
        "yolox": yolox,
    }
    meta = _validate_fields(bundle.path / META_FILE, fields)
    (bundle.path / WEIGHTS_FILE).write_bytes(weights_bytes)
    (bundle.path / META_FILE).write_text(meta_json(meta))
    return load_bundle(bundle.path)


def meta_json(meta: BundleMeta) -> str:
    """bundle.json's text. A bundle that is not quantized has no source_bundle / calibration keys at all (not
    nulls): a format-2 reader refuses keys it does not know, and these came with format 3."""
    fields = meta.model_dump(mode="json")
    for key in ("source_bundle", "calibration"):
        if fields["provenance"].get(key) is None:
            fields["provenance"].pop(key, None)
    return json.dumps(fields, indent=2) + "\n"


def format_for(meta_fields: dict) -> int:
    """The lowest format_version that holds these bundle.json fields: 3 with quantization provenance, else 2."""
    provenance = meta_fields.get("provenance") or {}
    return 3 if provenance.get("source_bundle") is not None or provenance.get("calibration") is not None else 2


def describe_provenance(meta: BundleMeta) -> list[str]:
    """Where the bundle came from, one line each, for commands that print a bundle's details."""
    provenance = meta.provenance
    lines = [f"trained on {provenance.dataset} for {provenance.epochs} epochs (trainer {provenance.trainer_version}, {provenance.created_at})"]
    if provenance.source_bundle is not None and provenance.calibration is not None:
        source, calibration = provenance.source_bundle, provenance.calibration
        lines.append(f"int8 of {source.name} (onnx sha256 {source.sha256[:12]}...), for {calibration.target}")
        lines.append(
            f"calibrated ({calibration.method}) on {calibration.images} images of {calibration.dataset}/{calibration.split} "
            f"from {calibration.experiment} (fingerprint {calibration.fingerprint[:12]}...)"
        )
    elif provenance.checkpoint:
        lines.append(f"from {provenance.checkpoint}")
    return lines


def _validate_fields(meta_path: Path, fields: dict) -> BundleMeta:
    try:
        return BundleMeta.model_validate(fields)
    except ValidationError as exc:
        raise BundleError(f"{meta_path}: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'bundle'}: {err['msg']}" for err in exc.errors())
