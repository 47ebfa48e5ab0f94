"""One EXIF orientation policy (as labelling tools show an image) for sizes, pixels, check-dataset and eval; tiny images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from synthetic import bccd_subset, make_voc, write_experiment
from trainer.config import load_experiment
from trainer.datasets import load_split
from trainer.datasets.check import check_dataset
from trainer.datasets.images import ORIENTATION_TAG, image_info, orient, read_image
from trainer.evaluate import evaluate, load_detector

SHIPPED = Path(__file__).parents[2] / "models" / "bccd-nano.bundle"
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
TEST_IMAGES = 12
# PIL's own turn for each orientation, applied to the displayed image, gives what a camera stores: its inverse.
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def _save_stored(displayed: Image.Image, path: Path, orientation: int, **options) -> Path:
    """Write `displayed` as a camera would store it with EXIF `orientation`: turned, with the tag saying how to undo it."""
    stored = displayed.transpose(STORED[orientation]) if orientation in STORED else displayed
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    stored.save(path, exif=exif, **options)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_size_and_pixels_are_the_displayed_image_as_pil_shows_it(tmp_path, orientation, suffix):
    rng = np.random.default_rng(orientation)
    displayed = Image.fromarray(rng.integers(0, 256, (24, 40, 3), np.uint8))  # 40 wide, 24 tall
    path = _save_stored(displayed, tmp_path / f"o{orientation}{suffix}", orientation, quality=100)
    info = image_info(path)
    assert (info.width, info.height, info.orientation, info.rotated) == (40, 24, orientation, orientation != 1)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))[:, :, ::-1]
    pixels = read_image(path, (40, 24))
    assert pixels.shape == (24, 40, 3) and pixels.flags.c_contiguous
    assert np.array_equal(pixels, expected)  # PIL and OpenCV decode the same file: the same pixels, turned alike


def test_orient_undoes_each_stored_turn():
    image = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    for orientation, turn in STORED.items():
        stored = np.asarray(Image.fromarray(image[:, :, 0].astype(np.uint8)).transpose(turn))[:, :, None]
        assert np.array_equal(orient(stored, orientation), image), orientation


def test_a_size_that_differs_from_the_dataset_is_an_error_naming_the_file(tmp_path):
    path = _save_stored(Image.new("RGB", (40, 24)), tmp_path / "a.png", 6)
    with pytest.raises(OSError, match=r"a\.png: decoded as 40x24, not the 24x40"):
        read_image(path, (24, 40))


@pytest.mark.parametrize("wh", [(1, 1), (7, 3), (5000, 1)])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_under_8_pixels_are_read(tmp_path, wh, suffix):
    path = tmp_path / f"tiny{suffix}"
    Image.new("RGB", wh, (200, 10, 10)).save(path)
    assert (image_info(path).width, image_info(path).height) == wh
    assert read_image(path, wh).shape == (wh[1], wh[0], 3)


@pytest.fixture(scope="module")
def rotated_bccd(bccd_root, tmp_path_factory):
    """The first TEST_IMAGES of BCCD's test split twice: as shipped, and stored turned with EXIF orientation 6 (the
    XML files unchanged: boxes in the displayed frame, as a labelling tool wrote them). (experiments by name)"""
    folder = tmp_path_factory.mktemp("exif")
    experiments = {}
    for name in ("original", "rotated"):
        root = bccd_subset(bccd_root, folder / name, {"test": TEST_IMAGES})
        if name == "rotated":
            for jpg in (root / "JPEGImages").iterdir():
                with Image.open(jpg) as image:
                    displayed = image.convert("RGB")
                _save_stored(displayed, jpg, 6, quality=95)
        config = write_experiment(folder / f"{name}.yaml", root, "voc", BCCD_CLASSES, name=name)
        experiments[name] = load_experiment(config)
    return experiments


def test_rotated_copies_read_as_the_originals(rotated_bccd):
    original, rotated = (load_split(rotated_bccd[name], "test") for name in ("original", "rotated"))
    assert len(rotated) == len(original) == TEST_IMAGES and not rotated.errors
    for a, b in zip(original.records, rotated.records):
        assert (b.width, b.height, b.orientation) == (a.width, a.height, 6)
        assert np.array_equal(a.xyxy, b.xyxy) and np.array_equal(a.class_id, b.class_id)  # no box clipped or dropped


def test_check_dataset_reports_the_rotated_images(rotated_bccd):
    report = check_dataset(rotated_bccd["rotated"], splits=("test",))
    [problem] = [p for p in report.problems if "stored rotated" in p.message]
    assert problem.severity == "warning" and problem.file.suffix == ".jpg"
    assert problem.message.startswith(f"{TEST_IMAGES} image(s) of the test split are stored rotated (EXIF orientation 6")
    assert not any("stored rotated" in p.message for p in check_dataset(rotated_bccd["original"], ("test",)).problems)


def test_rotated_copies_evaluate_like_the_originals(rotated_bccd):
    """The shipped model on the rotated copies: the same AP as on the originals, up to the JPEG re-encoding.

    Before the policy, PIL's stored size (480x640) clipped the displayed 640x480 frame's boxes: AP50 fell from
    0.871 to 0.689 on the whole test split (issue 16). 0.03 is the re-encoding's bar: on these 12 images mAP50
    measured 0.8721 (originals) and 0.8724 (rotated, re-encoded at quality 95).
    """
    if not (SHIPPED / "bundle.json").is_file():
        pytest.skip(f"no shipped bundle at {SHIPPED}")
    reports = {
        name: evaluate(load_detector(SHIPPED, exp), load_split(exp, "test")) for name, exp in rotated_bccd.items()
    }
    assert reports["original"].voc_map50 > 0.5  # the model detects: the comparison means something
    for key in ("voc_map50", "voc_map50_95", "coco_ap50"):
        assert getattr(reports["rotated"], key) == pytest.approx(getattr(reports["original"], key), abs=0.03), key


def test_check_dataset_reads_a_dataset_with_a_tiny_image(tmp_path):
    """An image under 8 px (draft at 1/8 scale used to ask PIL for a 0-pixel size) is an image like any other."""
    ds = make_voc(tmp_path / "data", n_images=4, background=0)
    tiny = ds.root / "JPEGImages" / "img_000.jpg"
    Image.new("RGB", (5, 3), (200, 10, 10)).save(tiny)
    report = check_dataset(load_experiment(write_experiment(tmp_path / "exp.yaml", ds.root, "voc", ds.classes)))
    assert not any(p.file == tiny and p.severity == "error" for p in report.problems)
    assert any((w, h) == (5, 3) for s in report.splits for w, h, _ in s.image_sizes)
