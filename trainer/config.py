"""The experiment: one validated YAML file (pydantic, unknown keys refused).

Relative paths are resolved against the folder of the YAML file, so a config
can be run from anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from streamd.model.bundle import ARCHITECTURES
from streamd.yamlconfig import load_yaml_model


class _Strict(BaseModel):
    # inf and nan pass `ge=0` (weight_decay: .inf) and poison a run hours later: refuse them here
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# The largest input side streamd.model.bundle accepts: a larger experiment could never be exported.
MAX_INPUT_SIDE = 4096
# The widest zoom range the mosaic and mixup steps may draw from (YOLOX uses 0.5-1.5 and 0.1-2).
MAX_AUGMENT_SCALE = 10.0


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    return value if value.is_absolute() or base is None else (Path(base) / value).resolve()


class DatasetConfig(_Strict):
    """Where the labelled images are and how they are split."""

    name: str = Field(min_length=1, description="Dataset name, recorded in the bundle's provenance.")
    format: Literal["voc", "coco"] = Field(description="Pascal VOC folders or COCO JSON.")
    root: Path = Field(description="VOC: folder with Annotations/, JPEGImages/, ImageSets/Main/. COCO: image folder.")
    train: str = Field("train", description="VOC: ImageSets/Main/<name>.txt; COCO: JSON file relative to root.")
    val: str = Field("val", description="Split used for model selection during training.")
    test: str = Field("test", description="Split used by `trainer eval` by default.")
    ignore_labels: tuple[str, ...] = Field(
        (), description="Annotation labels (VOC names, COCO category names) not trained: their boxes are dropped "
        "without an error. Any other label that is not one of `classes` is an error.",
    )

    _resolve_root = field_validator("root")(_resolve)

    def split(self, name: str) -> str:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


class ModelConfig(_Strict):
    architecture: Literal[ARCHITECTURES] = Field("yolox_nano", description="YOLOX size.")  # type: ignore[valid-type]
    input_hw: tuple[int, int] = Field((416, 416), description="Network input (height, width), multiples of 32.")
    pretrained: Path | None = Field(None, description="Megvii checkpoint ({'model': state_dict}) to fine-tune from.")

    _resolve_pretrained = field_validator("pretrained")(_resolve)

    @field_validator("input_hw")
    @classmethod
    def _multiple_of_32(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(v < 64 or v % 32 or v > MAX_INPUT_SIDE for v in value):
            raise ValueError(f"input_hw must be multiples of 32 from 64 to {MAX_INPUT_SIDE}, got {list(value)}")
        return value


def _scale_range(value: tuple[float, float]) -> tuple[float, float]:
    """A (low, high) zoom range: 0 < low <= high <= MAX_AUGMENT_SCALE."""
    low, high = value
    if not 0 < low <= high <= MAX_AUGMENT_SCALE:
        raise ValueError(f"must be [low, high] with 0 < low <= high <= {MAX_AUGMENT_SCALE:g}, got {list(value)}")
    return value


class AugmentConfig(_Strict):
    """YOLOX's augmentations; each can be switched off with probability 0."""

    mosaic_prob: float = Field(1.0, ge=0, le=1)
    mixup_prob: float = Field(0.0, ge=0, le=1)
    hsv_prob: float = Field(1.0, ge=0, le=1)
    flip_prob: float = Field(0.5, ge=0, le=1)
    degrees: float = Field(10.0, ge=0, le=180, description="Random rotation range (+/-) of the affine step.")
    translate: float = Field(0.1, ge=0, le=0.5)
    shear: float = Field(2.0, ge=0, le=45)
    mosaic_scale: tuple[float, float] = Field((0.5, 1.5), description="Zoom range of the mosaic's random affine.")
    mixup_scale: tuple[float, float] = Field((0.5, 1.5), description="Zoom range of the mixed-in image.")

    _scale_ranges = field_validator("mosaic_scale", "mixup_scale")(_scale_range)


class TrainConfig(_Strict):
    epochs: int = Field(100, ge=1, le=10000)
    batch_size: int = Field(16, ge=1, le=1024)
    lr_per_image: float = Field(0.01 / 64, gt=0, description="Base learning rate per image (YOLOX basic_lr_per_img).")
    warmup_epochs: int = Field(5, ge=0)
    no_aug_epochs: int = Field(15, ge=0, description="Last epochs trained without mosaic/mixup (YOLOX's tail).")
    min_lr_ratio: float = Field(0.05, gt=0, le=1)
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    ema: bool = True
    amp: bool = Field(True, description="Mixed precision; only takes effect on CUDA.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seeds Python, NumPy (which takes 0 to 2**32 - 1) and torch.")
    workers: int = Field(2, ge=0, le=64, description="Data loader worker processes.")
    eval_interval: int = Field(5, ge=1, description="Validate (mAP on the val split) every N epochs.")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _tail_fits(self) -> TrainConfig:
        if self.warmup_epochs + self.no_aug_epochs > self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) + no_aug_epochs ({self.no_aug_epochs}) "
                f"exceed epochs ({self.epochs})"
            )
        return self


class ExportConfig(_Strict):
    conf_threshold: float = Field(0.3, ge=0, le=1, description="Default confidence threshold written to the bundle.")
    iou_threshold: float = Field(0.45, gt=0, le=1, description="Default NMS IoU threshold written to the bundle.")
    opset: int = Field(17, ge=11, le=21)


class Experiment(_Strict):
    name: str = Field(min_length=1, max_length=128, description="Run and bundle name; the run folder is output_dir/name.")
    classes: tuple[str, ...] = Field(min_length=1, description="Class names in label order.")
    dataset: DatasetConfig
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    output_dir: Path = Field(Path("runs"), description="Runs go to output_dir/name/, relative to the working directory.")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        """One plain folder name: '..', 'a/b' or '/abs' would put the run outside output_dir."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError("must be one folder name under output_dir: letters, digits, '.', '_', '-', not starting with '.'")
        return value

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Unique, non-empty names that a label can equal: annotation labels are read stripped of blanks."""
        for name in value:
            if not name.strip() or name != name.strip() or any(ord(c) < 32 for c in name):
                raise ValueError(f"class name {name!r} is empty, has blanks around it or a control character")
        duplicates = sorted({c for c in value if value.count(c) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, repeated: {duplicates}")
        return value

    @model_validator(mode="after")
    def _ignored_are_not_classes(self) -> Experiment:
        both = sorted(set(self.classes) & set(self.dataset.ignore_labels))
        if both:
            raise ValueError(f"dataset.ignore_labels names classes that are trained: {both}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment YAML; raise streamd.errors.ConfigError naming file, line and field."""
    return load_yaml_model(path, Experiment)
