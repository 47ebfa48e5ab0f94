"""The torch backend's half of a bundle: the YOLOX state_dict as safetensors, and the architecture it fits.

safetensors holds tensors and nothing else, so loading a bundle never runs
code (a .pth is a pickle). The architecture fields are the YoloxConfig values
pixeltable-yolox rebuilds the model from (streamd.model.bundle.YoloxArch).
"""

from __future__ import annotations

import torch
from safetensors.torch import save

from trainer.config import Experiment
from trainer.yolox_adapter import unwrap, yolox_config

STRIDES = (8, 16, 32)  # YOLOX's head, which the ONNX decode and the torch backend's grids assume


def yolox_fields(exp: Experiment) -> dict:
    """bundle.json's `yolox` block for the experiment's architecture and classes."""
    config = yolox_config(exp)
    return {
        "depth": float(config.depth),
        "width": float(config.width),
        "depthwise": bool(config.depthwise),
        "act": str(config.act),
        "num_classes": len(exp.classes),
        "strides": list(STRIDES),
    }


def safetensors_bytes(model: torch.nn.Module | dict[str, torch.Tensor]) -> bytes:
    """The model's full state_dict (batch-norm statistics included) serialized as safetensors, on the CPU."""
    state = unwrap(model).state_dict() if isinstance(model, torch.nn.Module) else model
    return save({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()})
