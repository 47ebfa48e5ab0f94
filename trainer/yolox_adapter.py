"""The only file that touches YOLOX's config objects, datasets and training helpers.

The experiment (trainer.config) is mapped onto pixeltable-yolox here: model
construction, the mosaic/affine/HSV/flip pipeline, the optimizer's parameter
groups, the warm-cos schedule, EMA, and Megvii checkpoints.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from yolox.config import YoloxConfig
from yolox.data import MosaicDetection, TrainTransform
from yolox.data.datasets import Dataset as YoloxDataset
from yolox.utils import LRScheduler, ModelEMA

from trainer.config import Experiment
from trainer.datasets.images import read_image
from trainer.datasets.records import DatasetSplit

log = logging.getLogger(__name__)

# The loss terms a YOLOX model returns in training mode, total first.
LOSS_KEYS = ("total_loss", "iou_loss", "conf_loss", "cls_loss", "l1_loss")


def yolox_config(exp: Experiment) -> YoloxConfig:
    """YOLOX's config for the experiment's architecture, with our settings mapped onto it."""
    config = YoloxConfig.get_named_config(exp.model.architecture)
    if config is None:
        raise ValueError(f"YOLOX has no architecture {exp.model.architecture!r}")
    config.num_classes = len(exp.classes)
    config.input_size = tuple(exp.model.input_hw)
    config.test_size = tuple(exp.model.input_hw)
    config.max_epoch = exp.train.epochs
    config.warmup_epochs = exp.train.warmup_epochs
    config.no_aug_epochs = exp.train.no_aug_epochs
    config.min_lr_ratio = exp.train.min_lr_ratio
    config.basic_lr_per_img = exp.train.lr_per_image
    config.weight_decay = exp.train.weight_decay
    config.momentum = exp.train.momentum
    return config


def build_model(architecture: str, num_classes: int) -> nn.Module:
    """A freshly initialised YOLOX model (YOLOX's own init: BN eps/momentum, prior bias)."""
    config = YoloxConfig.get_named_config(architecture)
    if config is None:
        raise ValueError(f"YOLOX has no architecture {architecture!r}")
    config.num_classes = num_classes
    return config.get_model()


def build_optimizer(exp: Experiment, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with YOLOX's three parameter groups (no decay on BN and biases)."""
    config = yolox_config(exp)
    config.model = model
    return config.get_optimizer(exp.train.batch_size)


def build_scheduler(exp: Experiment, iters_per_epoch: int) -> LRScheduler:
    """YOLOX's warm-cos schedule: quadratic warm-up, cosine, flat minimum over the no-aug tail."""
    lr = exp.train.lr_per_image * exp.train.batch_size
    return LRScheduler(
        "yoloxwarmcos",
        lr,
        iters_per_epoch,
        exp.train.epochs,
        warmup_epochs=exp.train.warmup_epochs,
        warmup_lr_start=0,
        no_aug_epochs=exp.train.no_aug_epochs,
        min_lr_ratio=exp.train.min_lr_ratio,
    )


def build_ema(model: nn.Module) -> ModelEMA:
    """YOLOX's EMA of `model`'s weights (decay 0.9998, ramped up over the first updates); `.ema` is the averaged model."""
    return ModelEMA(model, 0.9998)


def load_ema(ema: ModelEMA, state: dict[str, torch.Tensor], updates: int) -> None:
    """Put a saved EMA back: its weights and its update count (which sets where the decay ramp stands)."""
    ema.ema.load_state_dict(state)
    ema.updates = updates


class RecordsDataset(YoloxDataset):
    """Our DatasetSplit in the shape YOLOX's MosaicDetection expects.

    pull_item returns the image resized so that it fits the input size (BGR
    uint8), its boxes scaled the same way as float32 [N, 5] (x1, y1, x2, y2,
    class), the original (height, width) and the index. Background images
    give an empty [0, 5] target: they train as negatives.
    """

    def __init__(self, split: DatasetSplit, input_hw: tuple[int, int], cache: bool = True):
        super().__init__(input_hw, mosaic=True)
        self.split = split
        self.input_hw = input_hw
        self._cache: dict[int, np.ndarray] = {}
        self.use_cache = cache
        self.annotations = [self._target(i) for i in range(len(split))]
        if cache:
            # Loaded in the main process so that every forked loader worker shares it.
            for index in range(len(split)):
                self.read_img(index)

    def __len__(self) -> int:
        return len(self.split)

    def _scale(self, index: int) -> float:
        record = self.split.records[index]
        return min(self.input_hw[0] / record.height, self.input_hw[1] / record.width)

    def _target(self, index: int) -> np.ndarray:
        record = self.split.records[index]
        target = np.zeros((len(record.xyxy), 5), dtype=np.float32)
        target[:, :4] = record.xyxy * self._scale(index)
        target[:, 4] = record.class_id
        return target

    def load_anno(self, index: int) -> np.ndarray:
        return self.annotations[index]

    def read_img(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index]
        record = self.split.records[index]
        image = read_image(record.path, (record.width, record.height))
        scale = self._scale(index)
        resized_wh = (max(1, int(record.width * scale)), max(1, int(record.height * scale)))  # a 5000x1 image keeps a row
        image = cv2.resize(image, resized_wh, interpolation=cv2.INTER_LINEAR)
        if self.use_cache:
            self._cache[index] = image
        return image

    def pull_item(self, index: int):
        record = self.split.records[index]
        return self.read_img(index), self.annotations[index].copy(), (record.height, record.width), index

    @YoloxDataset.mosaic_getitem
    def __getitem__(self, index: int):
        return self.pull_item(index)


def build_train_dataset(exp: Experiment, split: DatasetSplit) -> MosaicDetection:
    """The training pipeline: mosaic (+ mixup) -> random affine -> HSV -> flip -> letterbox."""
    aug = exp.augment
    base = RecordsDataset(split, tuple(exp.model.input_hw))
    return MosaicDetection(
        dataset=base,
        img_size=tuple(exp.model.input_hw),
        mosaic=aug.mosaic_prob > 0,
        preproc=TrainTransform(max_labels=120, flip_prob=aug.flip_prob, hsv_prob=aug.hsv_prob),
        degrees=aug.degrees,
        translate=aug.translate,
        mosaic_scale=tuple(aug.mosaic_scale),
        mixup_scale=tuple(aug.mixup_scale),
        shear=aug.shear,
        enable_mixup=aug.mixup_prob > 0,
        mosaic_prob=aug.mosaic_prob,
        mixup_prob=aug.mixup_prob,
    )


def set_no_aug(model: nn.Module, dataset: MosaicDetection) -> None:
    """YOLOX's tail: no mosaic/mixup, and the L1 box loss switched on."""
    dataset.enable_mosaic = False
    dataset.enable_mixup = False
    unwrap(model).head.use_l1 = True


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def worker_init(worker_id: int) -> None:
    seed = (torch.initial_seed() + worker_id) % 2**32
    random.seed(seed)
    np.random.seed(seed % 2**32)


def load_pretrained(model: nn.Module, path: Path) -> list[str]:
    """Load a Megvii checkpoint ({"model": state_dict}) into `model`.

    Weights whose name and shape match are loaded; the rest (the class
    predictors when the class count differs) keep their fresh initialisation.
    Returns the names that were not loaded, and logs a warning for them.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not a YOLOX checkpoint (expected a dict with a 'model' state_dict)")
    source = checkpoint["model"]
    target = model.state_dict()
    loadable = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    skipped = sorted(k for k in target if k not in loadable)
    model.load_state_dict(loadable, strict=False)
    if skipped:
        log.warning(
            "%s: %d of %d tensors not loaded (shape or name differs), re-initialised: %s",
            path,
            len(skipped),
            len(target),
            ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""),
        )
    return skipped


def inference_model(model: nn.Module) -> nn.Module:
    """The model in inference mode with the grid decode inside (YOLOX decode_in_inference)."""
    model = unwrap(model)
    model.eval()
    model.head.decode_in_inference = True
    return model
