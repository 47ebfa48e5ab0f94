"""What the machine has, asked without importing torch or initialising CUDA; and the one CUDA setting made before
the backend touches the GPU."""

from __future__ import annotations

import logging
from pathlib import Path

from streamd.config import StreamdConfig, gpu_index

log = logging.getLogger(__name__)


def nvidia_gpu_present() -> bool:
    """The NVIDIA driver's device nodes tell whether a GPU is there without initialising CUDA."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def set_primary_context_blocking_sync(device: int) -> tuple[bool, str]:
    """Put GPU `device`'s primary CUDA context in blocking-sync mode, before anything makes it active; (done, a line
    for the log saying what was done or why not).

    FFmpeg's NVDEC (hwaccel options primary_ctx=1) shares the primary context only when its flags are
    CU_CTX_SCHED_BLOCKING_SYNC; the backend (PyTorch, TensorRT) activates it with the default flags at its first
    allocation, after which every NVDEC stream creates a context of its own (each holds its own memory, and
    contexts time-slice the GPU). Set here through cuda-bindings' driver API (cuDevicePrimaryCtxSetFlags), which
    the GPU extra installs; the host thread then sleeps in a synchronisation instead of spinning.
    """
    try:
        from cuda.bindings import driver
    except ImportError as exc:
        return False, f"cuda-bindings is not importable ({exc}): NVDEC streams will get CUDA contexts of their own"
    wanted = driver.CUctx_flags.CU_CTX_SCHED_BLOCKING_SYNC
    try:
        _check(driver, "cuInit", driver.cuInit(0))
        gpu = _check(driver, "cuDeviceGet", driver.cuDeviceGet(device))
        flags, active = _check(driver, "cuDevicePrimaryCtxGetState", driver.cuDevicePrimaryCtxGetState(gpu))
        scheduling = int(flags) & int(driver.CUctx_flags.CU_CTX_SCHED_MASK)
        if active and scheduling == int(wanted):
            return True, f"CUDA device {device}: primary context already active in blocking-sync mode"
        if active:
            return False, (f"CUDA device {device}: primary context already active with flags {int(flags):#x} "
                           "(something used the GPU first): NVDEC streams will get CUDA contexts of their own")  # fmt: skip
        _check(driver, "cuDevicePrimaryCtxSetFlags", driver.cuDevicePrimaryCtxSetFlags(gpu, int(wanted)))
    except (RuntimeError, OSError) as exc:  # no driver: cuda.pathfinder raises a RuntimeError subclass
        return False, f"CUDA device {device}: primary context flags not set ({type(exc).__name__}: {exc})"
    return True, f"CUDA device {device}: primary context set to blocking sync, shared by inference and NVDEC"


def prepare_primary_context(config: StreamdConfig) -> bool:
    """Before the backend is built: when a stream of `config` may decode on NVDEC (hwaccel cuda,
    or auto on a machine with an NVIDIA GPU), set the primary context of the backend's GPU (config.gpu_index) to
    blocking sync and log the outcome (WARNING when it could not be set). True when set.
    """
    hwaccels = {stream.hwaccel for stream in config.streams}
    if "cuda" not in hwaccels and not ("auto" in hwaccels and nvidia_gpu_present()):
        return False
    done, line = set_primary_context_blocking_sync(gpu_index(config.backend))
    log.log(logging.INFO if done else logging.WARNING, line)
    return done


def _check(driver, call: str, result: tuple):
    """The values of a cuda-bindings driver call's (CUresult, *values); RuntimeError naming the call on an error."""
    error, *values = result
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"{call} failed: {error.name}")
    return values[0] if len(values) == 1 else tuple(values)
