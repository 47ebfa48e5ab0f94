"""Fixtures shared across the test tree. Keep this small: put a test file's own fixtures in that file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from synthetic import SyntheticDataset, make_coco, make_voc

# The real data beside the checkout; STREAMD_BCCD_ROOT names another copy (a GPU machine gets the test split's
# images in .gpu-data/BCCD from benchmarks/gpu_wheels.sh, since ../shared does not travel there).
BCCD_ROOT = Path(os.environ.get("STREAMD_BCCD_ROOT") or Path(__file__).parents[1] / ".." / "shared" / "datasets" / "BCCD")


@pytest.fixture(scope="session")
def voc_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """A clean synthetic VOC set (20 images + 2 background, circle and square), shared: do not modify."""
    return make_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def coco_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """The same images as voc_dataset, as COCO JSON with reversed, sparse category ids; do not modify."""
    return make_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """The real BCCD dataset (VOC, 364 images, RBC/WBC/Platelets); skips when the checkout has no shared data."""
    if not (BCCD_ROOT / "ImageSets" / "Main" / "train.txt").is_file():
        pytest.skip(f"BCCD dataset not found at {BCCD_ROOT}")
    return BCCD_ROOT.resolve()
