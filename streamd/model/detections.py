"""Columnar detections: the one result type of every model in the project."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Detections:
    """Detections of one image, one row per object.

    xyxy: float32 [N, 4], corners in the pixels of the frame they refer to
        (the source frame after `map_to_source`, the letterboxed input before).
    confidence: float32 [N], objectness x class score, in [0, 1].
    class_id: int64 [N], index into the bundle's class names.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        confidence = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        class_id = np.asarray(self.class_id, dtype=np.int64).reshape(-1)
        if not (len(xyxy) == len(confidence) == len(class_id)):
            raise ValueError(
                f"Detections columns differ in length: xyxy {len(xyxy)}, "
                f"confidence {len(confidence)}, class_id {len(class_id)}"
            )
        for name, array in (("xyxy", xyxy), ("confidence", confidence), ("class_id", class_id)):
            array.setflags(write=False)
            object.__setattr__(self, name, array)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.confidence)

    def __getitem__(self, index: np.ndarray | slice) -> Detections:
        """Rows selected by a boolean mask, an index array or a slice."""
        return Detections(self.xyxy[index], self.confidence[index], self.class_id[index])

    def to_records(self, class_names: tuple[str, ...]) -> list[dict]:
        """The detections as the JSON objects of the message schema (box rounded to 0.1 px)."""
        return [
            {
                "label": class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c)),
                "class_id": int(c),
                "score": round(float(s), 4),
                "box": [round(float(v), 1) for v in box],
            }
            for box, s, c in zip(self.xyxy, self.confidence, self.class_id)
        ]
