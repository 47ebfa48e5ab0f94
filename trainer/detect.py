"""The trainer's detectors: a bundle on ONNX Runtime, or a torch model, both as streamd's own Detector.

Both go through `streamd.detector.Detector` (streamd's letterbox,
backend interface and postprocess), so what the trainer measures is what
streamd runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streamd.backends.base import FunctionBackend
from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.model import Bundle, load_bundle
from streamd.detector import Detector
from trainer.yolox_adapter import inference_model

__all__ = ["Detector", "bundle_detector", "torch_detector"]


def bundle_detector(path: str | Path, threads: int = 0, max_batch: int = 8) -> tuple[Detector, Bundle]:
    """A detector running a bundle's ONNX model on ONNX Runtime, and the bundle."""
    bundle = load_bundle(path)
    backend = OnnxRuntimeBackend(bundle, max_batch=max_batch, intra_op_threads=threads)
    return Detector.for_bundle(bundle, backend), bundle


def torch_detector(
    model: torch.nn.Module, input_hw: tuple[int, int], class_names: tuple[str, ...], device: str = "cpu",
    max_batch: int = 8,
) -> Detector:  # fmt: skip
    """A detector running a YOLOX torch model (in eval mode, decode in graph)."""
    model = inference_model(model).to(device)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return Detector(FunctionBackend(run, tuple(input_hw), max_batch=max_batch, name="torch"), tuple(input_hw),
                    tuple(class_names))
