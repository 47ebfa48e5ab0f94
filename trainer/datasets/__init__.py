"""Datasets: Pascal VOC and COCO read into one record format, and their checks."""

from __future__ import annotations

from trainer.config import Experiment
from trainer.datasets.records import DatasetSplit, ImageRecord, Problem


def load_split(exp: Experiment, split: str) -> DatasetSplit:
    """Read one split (train, val or test) of the experiment's dataset."""
    ds = exp.dataset
    if ds.format == "voc":
        from trainer.datasets.voc import load_voc

        return load_voc(ds.root, ds.split(split), exp.classes, ds.name, ds.ignore_labels)
    from trainer.datasets.coco import load_coco

    return load_coco(ds.root, ds.root / ds.split(split), exp.classes, ds.name, split, ds.ignore_labels)


__all__ = ["DatasetSplit", "ImageRecord", "Problem", "load_split"]
