"""The one small interface every inference backend implements: submit a batch, wait for its output.

Asynchronous backends (TensorRT, torch on CUDA) return from `submit` at once
and compute while the caller prepares the next batch; a synchronous backend
(ONNX Runtime on the CPU) computes inside `submit` and returns a `Ready`
handle. Callers have one code path for both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class Pending(Protocol):
    """A submitted batch. wait() blocks until its output is on the host: float32 [N, A, 5 + C]."""

    def wait(self) -> np.ndarray: ...


class Backend(Protocol):
    """Runs a bundle's model on a batch.

    submit: float32 [N, 3, H, W] letterboxed batch (N <= max_batch) -> a Pending whose
    wait() gives float32 [N, A, 5 + C] (cx, cy, w, h in input pixels, objectness, class scores).
    """

    name: str
    max_batch: int

    def submit(self, batch: np.ndarray) -> Pending: ...

    def close(self) -> None: ...


class Ready:
    """The Pending of a synchronous backend: the output was computed inside submit()."""

    __slots__ = ("output",)

    def __init__(self, output: np.ndarray):
        self.output = output

    def wait(self) -> np.ndarray:
        return self.output


class FunctionBackend:
    """A synchronous backend around a function float32 [N, 3, H, W] -> float32 [N, A, 5 + C] (the trainer's torch model)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 8, name: str = "function"):
        self.run = run
        self.max_batch = max_batch
        self.name = name

    def submit(self, batch: np.ndarray) -> Ready:
        return Ready(self.run(batch))

    def close(self) -> None:
        pass
