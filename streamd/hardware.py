"""What the machine has, asked without importing torch or initialising CUDA."""

from __future__ import annotations

from pathlib import Path


def nvidia_gpu_present() -> bool:
    """The NVIDIA driver's device nodes tell whether a GPU is there without initialising CUDA."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()
