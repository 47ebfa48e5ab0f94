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

Format 4 adds, optionally, `golden`: a few small validation images (PNG, in
`golden/`) and the detections ONNX Runtime (CPU, fp32 arithmetic) made on
them from this bundle's `model.onnx` at export, each file with its sha256.
The daemon's self-test (streamd.selftest) runs them through the configured
backend before READY=1. A bundle is written with the lowest format that holds
its fields, so an fp32 bundle without golden frames stays format 2.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from streamd.errors import BundleError

FORMAT_VERSION = 4  # the newest; 1 to 4 are read, each bundle written with the lowest that holds it
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "bundle.json"
GOLDEN_DIR = "golden"
MAX_GOLDEN_IMAGES = 16
MAX_INT_DIGITS = 20  # longer integers in bundle.json are refused before Python parses them (5000 digits is slow)
# A file a bundle names: a plain name in the bundle's folder, or in its golden/ folder; nothing outside it.
BUNDLE_FILE = re.compile(rf"^(?:{GOLDEN_DIR}/)?[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}$")
ARCHITECTURES = ("yolox_nano", "yolox_tiny", "yolox_s", "yolox_m", "yolox_l", "yolox_x")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _bundle_file(value: str) -> str:
    """A file name that stays inside the bundle folder (no "..", no absolute path, no other folder)."""
    if not BUNDLE_FILE.match(value) or ".." in value:
        raise ValueError(f"must name a file inside the bundle folder (letters, digits, _ . -), got {value!r}")
    return value


def _checked_name(value: str) -> str:
    if not value or not value.isprintable() or value != value.strip():
        raise ValueError(f"must be printable text without control characters or surrounding spaces, got {value!r}")
    return value


class Preprocess(_Frozen):
    """How a frame becomes the `images` input."""

    resize: Literal["letterbox"] = Field("letterbox", description="Scale to fit, keep aspect, pad bottom/right.")
    pad_value: int = Field(114, ge=0, le=255, description="Value of the padding pixels.")
    channel_order: Literal["bgr", "rgb"] = Field("bgr", description="Channel order the model was trained on.")
    scale: float = Field(1.0, gt=0, le=255, description="Pixels are multiplied by this after mean/std (1/255 to 255).")
    mean: tuple[float, float, float] | None = Field(None, description="Per-channel mean subtracted (0..255), or none.")
    std: tuple[float, float, float] | None = Field(None, description="Per-channel std divided by (1e-3..255), or none.")

    @field_validator("mean")
    @classmethod
    def _mean_in_range(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and any(not 0 <= v <= 255 for v in value):
            raise ValueError(f"each mean must be within 0..255 (pixel values), got {value}")
        return value

    @field_validator("std")
    @classmethod
    def _std_in_range(cls, value: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if value is not None and any(not 1e-3 <= v <= 255 for v in value):
            raise ValueError(f"each std must be within 1e-3..255, got {value}")
        return value


class Thresholds(_Frozen):
    conf_threshold: float = Field(0.3, ge=0, le=1, description="Minimum objectness x class score.")
    iou_threshold: float = Field(0.45, gt=0, le=1, description="Class-aware NMS IoU threshold.")


BundleFile = Annotated[str, AfterValidator(_bundle_file)]
Name = Annotated[str, AfterValidator(_checked_name)]


class OnnxInfo(_Frozen):
    file: BundleFile = ONNX_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int = Field(ge=7, le=64)
    input_name: Name = Field("images", description="The graph's one input; checked against the model when it loads.")
    output_name: Name = Field("output", description="The graph's one output; checked against the model when it loads.")



class WeightsInfo(_Frozen):
    """The torch backend's weights: YOLOX's full state_dict (batch-norm included) in one safetensors file."""

    file: BundleFile = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the file; checked on every load.")
    format: Literal["safetensors"] = "safetensors"


class GoldenFile(_Frozen):
    """One file of the golden frames, in the bundle's golden/ folder, checked by sha256 on every load."""

    file: BundleFile = Field(description="Path inside the bundle, e.g. golden/frame-0.png.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Golden(_Frozen):
    """Golden frames (format 4): images and the reference detections the self-test compares a backend with."""

    images: tuple[GoldenFile, ...] = Field(min_length=1, max_length=MAX_GOLDEN_IMAGES, description="BGR PNGs.")
    detections: GoldenFile = Field(description="JSON: per image, xyxy (image pixels), confidence and class_id.")
    reference: str = Field(min_length=1, description="What computed the detections, e.g. onnxruntime fp32 (CPU).")
    source: str = Field(min_length=1, description="Where the images came from, e.g. BCCD/val: the first 4 images.")
    conf_threshold: float = Field(ge=0, le=1, description="Thresholds the detections were made with.")
    iou_threshold: float = Field(gt=0, le=1)


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
        FORMAT_VERSION, ge=1, le=FORMAT_VERSION,
        description="1: ONNX only; 2: + weights; 3: + quantization provenance; 4: + golden frames.",
    )  # fmt: skip
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
    golden: Golden | None = Field(None, description="Golden frames for the self-test before READY=1 (format 4).")

    @field_validator("input_hw")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(v <= 0 or v % 32 or v > 4096 for v in value):
            raise ValueError(f"input_hw must be multiples of 32 (YOLOX strides) from 32 to 4096, got {value}")
        return value

    @field_validator("class_names")
    @classmethod
    def _distinct_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, name in enumerate(value):
            try:
                _checked_name(name)
            except ValueError as exc:
                raise ValueError(f"class_names[{index}] {exc}") from None
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"class names must be distinct; repeated: {', '.join(map(repr, repeated))}")
        return value

    @model_validator(mode="after")
    def _weights_fit(self) -> BundleMeta:
        if (self.weights is None) != (self.yolox is None):
            raise ValueError("weights and yolox come together: the weights need the architecture they fit")
        if self.weights is not None and self.format_version < 2:
            raise ValueError("weights and yolox need format_version 2")
        if self.provenance.source_bundle is not None and self.format_version < 3:
            raise ValueError("provenance.source_bundle and provenance.calibration need format_version 3")
        if self.golden is not None and self.format_version < 4:
            raise ValueError("golden needs format_version 4")
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
    """Read and check a bundle folder; raise BundleError naming the file and field at fault.

    Every file bundle.json names (model.onnx, weights.safetensors, golden/...) must be inside the folder and,
    with verify, match its sha256.
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: not a model bundle folder (expected a directory with {META_FILE} and {ONNX_FILE})")
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: missing")
    meta = _validate_fields(meta_path, read_meta_json(meta_path))
    checked = [(meta.onnx.file, meta.onnx.sha256, "onnx")]
    if meta.weights is not None:
        checked.append((meta.weights.file, meta.weights.sha256, "weights"))
    if meta.golden is not None:
        checked += [(f.file, f.sha256, f"golden.images[{i}]") for i, f in enumerate(meta.golden.images)]
        checked.append((meta.golden.detections.file, meta.golden.detections.sha256, "golden.detections"))
    for name, _, field in checked:
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing (named by {meta_path} field {field}.file)")
        if not file.resolve().is_relative_to(path.resolve()):
            raise BundleError(f"{meta_path}: {field}.file: {name} leads outside the bundle folder (a link to {file.resolve()})")
    for name, expected, field in checked if verify else ():
        actual = sha256_file(path / name)
        if actual != expected:
            raise BundleError(
                f"{path / name}: sha256 {actual[:12]}... does not match {field}.sha256 "
                f"{expected[:12]}... in {meta_path}; the file was changed after export"
            )
    return Bundle(path=path, meta=meta)


def check_io_names(bundle: Bundle, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """BundleError naming bundle.json's onnx.input_name / onnx.output_name when model.onnx's graph does not have
    exactly that one input and that one output (inputs / outputs: the graph's names, as the runtime reads them)."""
    onnx = bundle.meta.onnx
    for field, named, actual in (("input_name", onnx.input_name, inputs), ("output_name", onnx.output_name, outputs)):
        if list(actual) != [named]:
            raise BundleError(
                f"{bundle.path / META_FILE}: onnx.{field} is {named!r} but {bundle.onnx_path.name} has "
                f"{field.split('_')[0]}s {list(actual)}; the bundle.json does not describe this model"
            )


class _LongInteger:
    """An integer literal too long to be any bundle.json field: kept as its digit count, refused by validation."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def read_meta_json(meta_path: Path) -> dict:
    """bundle.json parsed strictly: UTF-8, no key twice in one object, no integer over MAX_INT_DIGITS digits.

    A long integer becomes a _LongInteger that validation refuses naming its field.
    """

    def unique_keys(pairs: list[tuple[str, object]]) -> dict:
        fields: dict = {}
        for key, value in pairs:
            if key in fields:
                raise BundleError(f"{meta_path}: field {key!r} appears twice in one object; which one is meant?")
            fields[key] = value
        return fields

    def integer(text: str) -> int | _LongInteger:
        return _LongInteger(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)

    try:
        return json.loads(meta_path.read_bytes().decode("utf-8"), object_pairs_hook=unique_keys, parse_int=integer)
    except UnicodeDecodeError as exc:
        raise BundleError(f"{meta_path}: not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}") from exc
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{meta_path}: not valid JSON: {exc}") from exc


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


def add_golden(path: str | Path, files: dict[str, bytes], golden: dict) -> Bundle:
    """Write golden frames into an existing bundle: `files` ({"golden/NAME": bytes}) and bundle.json's `golden`.

    golden: Golden's fields with each file's sha256 left out (filled in here from `files`); "images" and
    "detections" name files of `files`. model.onnx and every other field stay as they are; bundle.json becomes
    format 4. Golden files of an earlier add_golden that the new entry does not name are removed.
    """
    bundle = load_bundle(path)
    entry = {
        **golden,
        "images": [{"file": name, "sha256": hashlib.sha256(files[name]).hexdigest()} for name in golden["images"]],
        "detections": {"file": golden["detections"], "sha256": hashlib.sha256(files[golden["detections"]]).hexdigest()},
    }
    fields = bundle.meta.model_dump(mode="json") | {"golden": entry}
    meta = _validate_fields(bundle.path / META_FILE, fields | {"format_version": format_for(fields)})
    folder = bundle.path / GOLDEN_DIR
    folder.mkdir(exist_ok=True)
    for stale in set(folder.iterdir()) - {bundle.path / name for name in files}:
        stale.unlink()
    for name, data in files.items():
        (bundle.path / name).write_bytes(data)
    (bundle.path / META_FILE).write_text(meta_json(meta))
    return load_bundle(bundle.path)


def meta_json(meta: BundleMeta) -> str:
    """bundle.json's text. A field that a later format added and this bundle does not use is left out, not
    written as null (source_bundle / calibration came with format 3, golden with 4): an older reader refuses
    keys it does not know, and an fp32 bundle without golden frames stays readable by a format-2 reader."""
    fields = meta.model_dump(mode="json")
    for key in ("source_bundle", "calibration"):
        if fields["provenance"].get(key) is None:
            fields["provenance"].pop(key, None)
    if fields.get("golden") is None:
        fields.pop("golden", None)
    return json.dumps(fields, indent=2) + "\n"


def format_for(meta_fields: dict) -> int:
    """The lowest format_version that holds these bundle.json fields: 4 with golden frames, 3 with quantization
    provenance, else 2."""
    provenance = meta_fields.get("provenance") or {}
    if meta_fields.get("golden") is not None:
        return 4
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
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'bundle'}: {_message(err)}" for err in exc.errors())


def _message(error: dict) -> str:
    found = error.get("input")
    if isinstance(found, _LongInteger):
        return f"an integer of {found.digits} digits is out of range (at most {MAX_INT_DIGITS} digits)"
    return error["msg"]
