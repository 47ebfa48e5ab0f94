"""Detectors used by evaluation and prediction: a bundle on ONNX Runtime, or a torch model.

Both go through streamd's own letterbox and postprocess, so what the trainer
measures is what streamd runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.model import Detections, letterbox_batch, load_bundle, postprocess
from streamd.model.bundle import Preprocess


@dataclass
class Detector:
    """Letterbox -> run -> postprocess, in batches.

    run: float32 [N, 3, H, W] -> float32 [N, A, 5 + C].
    """

    run: object
    input_hw: tuple[int, int]
    class_names: tuple[str, ...]
    preprocess: Preprocess = Preprocess()
    name: str = "model"
    sha256: str = ""

    def detect(self, images_bgr: list[np.ndarray], conf_threshold: float, iou_threshold: float) -> list[Detections]:
        batch, scales = letterbox_batch(images_bgr, self.input_hw, self.preprocess)
        output = self.run(batch)
        return postprocess(output, scales, [im.shape[:2] for im in images_bgr], conf_threshold, iou_threshold)


def bundle_detector(path: str | Path, threads: int = 0) -> tuple[Detector, object]:
    """A detector running a bundle's ONNX model on ONNX Runtime, and the bundle."""
    bundle = load_bundle(path)
    backend = OnnxRuntimeBackend(bundle, intra_op_threads=threads)
    detector = Detector(
        backend.infer, tuple(bundle.meta.input_hw), bundle.class_names, bundle.meta.preprocess, bundle.meta.name, bundle.sha256
    )
    return detector, bundle


def torch_detector(model: torch.nn.Module, input_hw: tuple[int, int], class_names: tuple[str, ...], device: str = "cpu") -> Detector:
    """A detector running a YOLOX torch model (in eval mode, decode in graph)."""
    from trainer.yolox_adapter import inference_model

    model = inference_model(model).to(device)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return Detector(run, tuple(input_hw), tuple(class_names))
