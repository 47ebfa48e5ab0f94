"""TensorRT engines from a bundle (fp32, fp16, int8), built and cached by streamd's TensorRT backend.

The engine is built on the machine that runs it (an engine is tied to its GPU
and TensorRT version) and cached beside the bundle under the key streamd
looks up. For int8, this module adds what only the trainer has: calibration
images from the dataset, letterboxed exactly as streamd will feed them, and a
calibration cache keyed by the model and the calibration images (a new image
set recalibrates). A bundle made by `trainer quantize --for tensorrt` carries
its own scales (Q/DQ nodes) and builds without calibration data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamd.errors import BackendError
from streamd.model import load_bundle
from streamd.model.bundle import describe_provenance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineResult:
    bundle: str
    engine: str
    precision: str
    max_batch: int
    seconds: float


CALIBRATION_BATCH = 8  # images per calibration batch (fewer when max_batch is smaller)


def make_int8_calibrator(batches, batch_size: int, cache_path: Path, source: str):
    """An IInt8EntropyCalibrator2 feeding `batches` (float32 [batch_size, 3, H, W]) through a torch CUDA buffer.

    TensorRT's bindings swallow an exception raised in get_batch and end the
    calibration early as if the data had run out; get_batch catches it instead,
    keeps it in `error` as a ValueError naming `source` (the experiment file)
    and the batch, and returns None: serialize_engine raises it after the
    build. A batch of another size is such an error (TensorRT would read
    batch_size images from it), as is a calibration with no batch at all.
    """
    import tensorrt as trt
    import torch

    from streamd.backends.tensorrt_build import write_atomic

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            self.cache_path = cache_path
            self.device_buffer = None  # kept until the next get_batch: TensorRT reads it after we return
            self.error: BaseException | None = None
            self.fed = 0

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            if self.error is not None:
                return None
            try:
                batch = next(self.batches, None)
                if batch is None:
                    if self.fed == 0:
                        raise ValueError(f"no calibration batch of {batch_size} readable images")
                    return None
                if batch.shape[0] != batch_size or batch.dtype != np.float32:
                    raise ValueError(f"got a {batch.dtype} batch of shape {batch.shape}, TensorRT reads float32 [{batch_size}, ...]")
                self.device_buffer = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            except Exception as exc:  # noqa: BLE001  (kept and raised after the build: see the docstring)
                self.error = ValueError(f"{source}: int8 calibration stopped at batch {self.fed + 1}: {exc}")
                self.error.__cause__ = exc
                return None
            self.fed += 1
            return [int(self.device_buffer.data_ptr())]

        def read_calibration_cache(self):
            return self.cache_path.read_bytes() if self.cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            # After a failed batch, TensorRT still writes the scales of the batches it got: never keep those, or
            # the next build with the same images would read them and skip the calibration, silently.
            if self.error is None:
                write_atomic(self.cache_path, bytes(cache))

    return Calibrator()


def calibration_key(onnx_sha256: str, calibration_fingerprint: str, batch_size: int) -> str:
    """sha256 of what an int8 calibration depends on: the model, the images (CalibrationSet.fingerprint), the batch, the method.

    Names the calibration cache (BUNDLE/calibration-ONNX12-KEY16.cache) and is
    recorded in the engine's key note, so that new calibration images give a
    new calibration and a rebuilt engine instead of the cached ones.
    """
    return hashlib.sha256(f"{onnx_sha256}|{calibration_fingerprint}|{batch_size}|entropy2".encode()).hexdigest()


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
    from streamd.backends.tensorrt_build import check_qdq

    try:
        import tensorrt  # noqa: F401  (the calibrator subclasses one of its classes)
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed here ({exc}); build engines on the GPU machine that runs them") from exc
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    bundle = load_bundle(bundle_path)
    for line in describe_provenance(bundle.meta):
        log.info("%s: %s", bundle.path, line)
    calibrator = key = None
    if precision == "int8" and check_qdq(bundle.onnx_path):
        if calibration_data is not None:
            raise ValueError(f"{bundle.onnx_path}: the model carries its own int8 scales (Q/DQ nodes); build it without --data")
    elif precision == "int8":
        if calibration_data is None:
            raise ValueError(
                f"{bundle.path}: int8 needs calibration images: pass --data EXPERIMENT.yaml (its train split is used), "
                "or quantize the bundle with `trainer quantize --for tensorrt` first"
            )
        from trainer.config import load_experiment
        from trainer.export.calibration import calibration_set

        calibration = calibration_set(load_experiment(calibration_data), bundle, calibration_images, calibration_data)
        batch_size = min(CALIBRATION_BATCH, max_batch, len(calibration.paths))
        key = calibration_key(bundle.sha256, calibration.fingerprint(), batch_size)
        calibrator = make_int8_calibrator(
            calibration.batches(batch_size, drop_last=True),  # TensorRT takes every batch at its declared size
            batch_size,
            bundle.path / f"calibration-{bundle.sha256[:12]}-{key[:16]}.cache",
            str(calibration_data),
        )
    started = time.time()
    engine_path = build_cached_engine(
        bundle, precision=precision, max_batch=max_batch, device=device, engine_cache_dir=engine_cache_dir,
        calibrator=calibrator, calibration_key=key,
    )
    return EngineResult(str(bundle.path), str(engine_path), precision, max_batch, round(time.time() - started, 1))
