"""Choose the inference backend a config names, by one `match`.

onnxruntime: the CPU default, always installed. tensorrt: NVIDIA GPUs; it
and torch (its CUDA runtime) are imported only when that backend is built.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from streamd.backends.base import Backend
from streamd.config import AutoBackendConfig, BackendConfig, OnnxRuntimeConfig, TensorRTConfig
from streamd.errors import BackendError
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)


def tensorrt_usable() -> tuple[bool, str]:
    """Whether `auto` should pick TensorRT, and why (without importing torch or tensorrt)."""
    for module in ("tensorrt", "torch"):
        if importlib.util.find_spec(module) is None:
            return False, f"{module} is not installed"
    # The driver's device nodes tell whether a GPU is there without initialising CUDA.
    if not Path("/proc/driver/nvidia/gpus").is_dir() and not Path("/dev/nvidia0").exists():
        return False, "no NVIDIA GPU found"
    return True, "tensorrt and an NVIDIA GPU are present"


def make_backend(bundle: Bundle, config: BackendConfig, max_batch: int = 8) -> Backend:
    """Build the backend the config names, for batches of up to max_batch frames."""
    match config:
        case OnnxRuntimeConfig(threads=threads):
            from streamd.backends.onnxruntime import OnnxRuntimeBackend

            return OnnxRuntimeBackend(bundle, max_batch=max_batch, intra_op_threads=threads)
        case TensorRTConfig():
            from streamd.backends.tensorrt import TensorRTBackend

            return TensorRTBackend(bundle, config, max_batch=max_batch)
        case AutoBackendConfig():
            usable, why = tensorrt_usable()
            if usable:
                try:
                    return make_backend(bundle, TensorRTConfig(type="tensorrt"), max_batch)
                except BackendError as exc:
                    log.warning("backend auto: TensorRT failed (%s); using ONNX Runtime on the CPU", exc)
            else:
                log.info("backend auto: %s; using ONNX Runtime on the CPU", why)
            return make_backend(bundle, OnnxRuntimeConfig(type="onnxruntime"), max_batch)
        case _:
            raise BackendError(f"unknown backend config {config!r}")
