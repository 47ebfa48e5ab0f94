"""TensorRT engines from a bundle (fp32, fp16, int8), built and cached by streamd's TensorRT backend.

The engine is built on the machine that runs it (an engine is tied to its GPU
and TensorRT version) and cached beside the bundle under the key streamd
looks up. For int8, this module adds what only the trainer has: calibration
images from the dataset, letterboxed exactly as streamd will feed them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.errors import BackendError
from streamd.model import load_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    bundle: str
    engine: str
    precision: str
    max_batch: int
    seconds: float


def make_int8_calibrator(batches, batch_size: int, cache_path: Path):
    """An IInt8EntropyCalibrator2 feeding `batches` through a torch CUDA buffer."""
    import tensorrt as trt
    import torch

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            self.device_buffer = None

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.device_buffer = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            return [int(self.device_buffer.data_ptr())]

        def read_calibration_cache(self):
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            cache_path.write_bytes(bytes(cache))

    return Calibrator()


def build_engine(
    bundle_path: Path,
    precision: str,
    max_batch: int,
    calibration_data: Path | None,
    calibration_images: int,
    engine_cache_dir: Path | None = None,
    device: int = 0,
) -> EngineResult:
    """Build (or find cached) the engine of `bundle_path` for this GPU, where the daemon will look for it.

    engine_cache_dir and max_batch must be the daemon config's (backend.engine_cache_dir,
    batch.max_batch): both select the cached file.
    """
    import time

    from streamd.backends.tensorrt_build import build_engine as build_cached_engine

    try:
        import tensorrt  # noqa: F401  (the calibrator subclasses one of its classes)
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed here ({exc}); build engines on the GPU machine that runs them") from exc
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    bundle = load_bundle(bundle_path)
    calibrator = None
    if precision == "int8":
        if calibration_data is None:
            raise ValueError("int8 needs calibration images: pass --data EXPERIMENT.yaml (its train split is used)")
        from trainer.config import load_experiment
        from trainer.export.calibration import calibration_set

        calibration = calibration_set(load_experiment(calibration_data), bundle, calibration_images, calibration_data)
        batch_size = min(8, max_batch)
        calibrator = make_int8_calibrator(
            calibration.batches(batch_size, drop_last=True),  # TensorRT takes every batch at its declared size
            batch_size,
            bundle.path / f"calibration-{bundle.sha256[:12]}.cache",
        )
    started = time.time()
    engine_path = build_cached_engine(
        bundle, precision=precision, max_batch=max_batch, device=device, engine_cache_dir=engine_cache_dir, calibrator=calibrator
    )
    return EngineResult(str(bundle.path), str(engine_path), precision, max_batch, round(time.time() - started, 1))
