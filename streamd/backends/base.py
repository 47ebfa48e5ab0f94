"""The one small interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs a bundle's model on a batch.

    infer: float32 [N, 3, H, W] letterboxed batch -> float32 [N, A, 5 + C]
    (cx, cy, w, h in input pixels, objectness, class scores), N <= max_batch.
    """

    name: str
    max_batch: int

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
