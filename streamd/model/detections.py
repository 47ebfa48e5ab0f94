"""Columnar detections: the one result type of every model in the project."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True, slots=True)
class Detections:
    """Detections of one image, one row per object.

    xyxy: float32 [N, 4], corners in the pixels of the frame they refer to
        (the source frame after `map_to_source`, the letterboxed input before).
    confidence: float32 [N], objectness x class score, in [0, 1].
    class_id: int64 [N], index into the bundle's class names.
    Optional columns, None until a stream's tracker fills them (streamd.stages.track):
    track_id: int64 [N], the row's track in its stream (-1: no track).
    confirmed: bool [N], whether that track is confirmed (N of its last M frames).
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    track_id: np.ndarray | None = None
    confirmed: np.ndarray | None = None

    def __post_init__(self) -> None:
        columns = {
            "xyxy": np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4),
            "confidence": np.asarray(self.confidence, dtype=np.float32).reshape(-1),
            "class_id": np.asarray(self.class_id, dtype=np.int64).reshape(-1),
        }
        if self.track_id is not None:
            columns["track_id"] = np.asarray(self.track_id, dtype=np.int64).reshape(-1)
        if self.confirmed is not None:
            columns["confirmed"] = np.asarray(self.confirmed, dtype=bool).reshape(-1)
        if len({len(array) for array in columns.values()}) > 1:
            raise ValueError(
                "Detections columns differ in length: " + ", ".join(f"{k} {len(v)}" for k, v in columns.items())
            )
        for name, array in columns.items():
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.confidence)

    def __getitem__(self, index: np.ndarray | slice) -> Detections:
        """Rows selected by a boolean mask, an index array or a slice (every column present)."""
        return Detections(
            self.xyxy[index], self.confidence[index], self.class_id[index],
            None if self.track_id is None else self.track_id[index],
            None if self.confirmed is None else self.confirmed[index],
        )  # fmt: skip

    def with_tracks(self, track_id: np.ndarray, confirmed: np.ndarray) -> Detections:
        """The same rows with their track columns."""
        return replace(self, track_id=track_id, confirmed=confirmed)
