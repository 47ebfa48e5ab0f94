"""Choose the inference backend a config names, by one `match`.

onnxruntime: the CPU default, always installed. tensorrt: NVIDIA GPUs; it
and torch (its CUDA runtime) are imported only when that backend is built.
torch: PyTorch on CUDA or the CPU from the bundle's weights.safetensors;
torch is imported only when it is built. `auto` picks tensorrt, then torch
on CUDA, then onnxruntime, and logs what it chose and why.
"""

from __future__ import annotations

import importlib.util
import logging

from streamd.backends.base import Backend
from streamd.config import AutoBackendConfig, BackendConfig, OnnxRuntimeConfig, TensorRTConfig, TorchConfig
from streamd.errors import BackendError
from streamd.hardware import nvidia_gpu_present
from streamd.model.bundle import Bundle

log = logging.getLogger(__name__)

TORCH_MODULES = ("torch", "torchvision", "yolox", "safetensors")  # the `gpu` extra


def _missing(modules: tuple[str, ...]) -> str | None:
    return next((m for m in modules if importlib.util.find_spec(m) is None), None)


def tensorrt_usable() -> tuple[bool, str]:
    """Whether `auto` should pick TensorRT, and why (without importing torch or tensorrt)."""
    missing = _missing(("tensorrt", "torch"))
    if missing:
        return False, f"{missing} is not installed"
    if not nvidia_gpu_present():
        return False, "no NVIDIA GPU found"
    return True, "tensorrt and an NVIDIA GPU are present"


def torch_cuda_usable(bundle: Bundle) -> tuple[bool, str]:
    """Whether `auto` should pick the torch backend on cuda:0, and why (without importing torch)."""
    if bundle.weights_path is None:
        return False, f"{bundle.path} has no weights.safetensors for the torch backend"
    missing = _missing(TORCH_MODULES)
    if missing:
        return False, f"{missing} is not installed (pip install '.[gpu]')"
    if not nvidia_gpu_present():
        return False, "no NVIDIA GPU found"
    return True, "torch and an NVIDIA GPU are present and the bundle has weights"


def make_backend(bundle: Bundle, config: BackendConfig, max_batch: int = 8) -> Backend:
    """Build the backend the config names, for batches of up to max_batch frames."""
    match config:
        case OnnxRuntimeConfig(threads=threads):
            from streamd.backends.onnxruntime import OnnxRuntimeBackend

            return OnnxRuntimeBackend(bundle, max_batch=max_batch, intra_op_threads=threads)
        case TensorRTConfig():
            from streamd.backends.tensorrt import TensorRTBackend

            return TensorRTBackend(bundle, config, max_batch=max_batch)
        case TorchConfig():
            try:
                from streamd.backends.torch import TorchBackend
            except ImportError as exc:
                raise BackendError(f"backend torch: {exc.name or exc} is not installed (pip install '.[gpu]')") from exc
            return TorchBackend(bundle, config, max_batch=max_batch)
        case AutoBackendConfig():
            return _auto(bundle, max_batch)
        case _:
            raise BackendError(f"unknown backend config {config!r}")


def _auto(bundle: Bundle, max_batch: int) -> Backend:
    """tensorrt, else torch on cuda:0, else onnxruntime; each failure to build is logged and falls through."""
    why_not = []
    candidates = (
        ("TensorRT", tensorrt_usable, lambda: TensorRTConfig(type="tensorrt")),
        ("torch on cuda:0", lambda: torch_cuda_usable(bundle), lambda: TorchConfig(type="torch", device="cuda:0")),
    )
    for label, usable, config in candidates:
        ok, why = usable()
        if not ok:
            why_not.append(f"not {label}: {why}")
            continue
        try:
            backend = make_backend(bundle, config(), max_batch)
        except BackendError as exc:
            log.warning("backend auto: %s failed (%s); trying the next backend", label, exc)
            why_not.append(f"{label} failed")
            continue
        log.info("backend auto: %s (%s)", label, "; ".join([*why_not, why]))
        return backend
    log.info("backend auto: ONNX Runtime on the CPU (%s)", "; ".join(why_not))
    return make_backend(bundle, OnnxRuntimeConfig(type="onnxruntime"), max_batch)
