"""The torch device of `train.device`, for training and for evaluating a checkpoint."""

from __future__ import annotations

import os

import torch


def pick_device(setting: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; under torchrun, CUDA is the process's LOCAL_RANK GPU.

    Raises RuntimeError for `cuda` on a machine without a CUDA device.
    """
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
