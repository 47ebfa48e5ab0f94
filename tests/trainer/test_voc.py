"""load_voc: synthetic sets with one injected flaw each, hand-written XML, and the real BCCD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthetic import SPLITS, SyntheticDataset, make_voc
from trainer.datasets.records import DatasetSplit, Problem
from trainer.datasets.voc import load_voc

CLASSES = ("circle", "square")
BCCD_CLASSES = ("RBC", "WBC", "Platelets")


def assert_matches(split: DatasetSplit, ds: SyntheticDataset, split_name: str) -> None:
    """The records are exactly the images the generator says this split must load, with their boxes."""
    expected = {image.file_name: image for image in ds.in_split(split_name)}
    assert sorted(r.path.name for r in split.records) == sorted(expected)
    for record in split.records:
        image = expected[record.path.name]
        assert (record.width, record.height) == ds.image_wh
        assert record.background == image.background
        np.testing.assert_array_equal(record.xyxy, np.array([o.xyxy for o in image.objects], np.float32).reshape(-1, 4))
        assert record.class_id.tolist() == [ds.classes.index(o.class_name) for o in image.objects]
        assert record.difficult.tolist() == [o.difficult for o in image.objects]


@pytest.mark.parametrize("split_name", SPLITS)
def test_clean_dataset_loads_every_image_and_box(voc_dataset: SyntheticDataset, split_name: str) -> None:
    split = load_voc(voc_dataset.root, split_name, CLASSES, "synthetic")
    assert (split.dataset, split.split, split.class_names, split.problems) == ("synthetic", split_name, CLASSES, ())
    assert_matches(split, voc_dataset, split_name)


@pytest.mark.parametrize(
    ("split_name", "num_images", "num_background"),
    [("train", 13, 1), ("val", 5, 1), ("test", 4, 0)],  # 20 images 60/20/20 + 2 background, round robin
)
def test_background_images_are_records_without_boxes(
    voc_dataset: SyntheticDataset, split_name: str, num_images: int, num_background: int
) -> None:
    split = load_voc(voc_dataset.root, split_name, CLASSES)
    background = [r for r in split.records if r.background]
    assert (len(split), split.num_background, len(background)) == (num_images, num_background, num_background)
    assert all(r.xyxy.shape == (0, 4) and r.class_id.shape == (0,) for r in background)
    assert all(not (voc_dataset.root / "Annotations" / f"{r.image_id}.xml").exists() for r in background)


@pytest.mark.parametrize(
    ("flaw", "expected"),
    [
        ("malformed_xml", ("error", "malformed XML")),
        ("unknown_class", ("warning", "unknown class 'hexagon' (known: circle, square), box dropped")),
        ("zero_area_box", ("warning", "zero-area box")),
        ("outside_box", ("warning", "(square) outside the 128x96 image, clipped")),
        ("missing_image", ("error", "image 'flaw_missing_image' listed but not found in JPEGImages/")),
        ("unreadable_image", ("error", "unreadable image")),
        ("size_mismatch", ("warning", "<size> 144x96 differs from the image's 128x96")),
        ("uppercase_png", None),
        ("crowd", None),
        ("repeated_across_splits", None),  # a reader sees one split; the dataset check finds this one
    ],
)
def test_each_flaw_gives_one_problem_in_its_file(tmp_path: Path, flaw: str, expected: tuple[str, str] | None) -> None:
    ds = make_voc(tmp_path, n_images=3, background=0, extras=(flaw,))
    split = load_voc(ds.root, "train", CLASSES)
    if expected is None:
        assert split.problems == ()
    else:
        [problem] = split.problems
        severity, fragment = expected
        assert (problem.severity, problem.file) == (severity, ds.flaw_files[flaw])
        assert fragment in problem.message
    assert_matches(split, ds, "train")


XML_HEAD = "<annotation><size><width>{w}</width><height>{h}</height></size>"
OBJECT = "<object><name>{name}</name><bndbox><xmin>{x1}</xmin><ymin>2</ymin><xmax>20</xmax><ymax>22</ymax></bndbox></object>"
GOOD_OBJECT = OBJECT.format(name="square", x1=4)


@pytest.mark.parametrize(
    ("xml", "expected_boxes", "expected_problem"),
    [
        (XML_HEAD.format(w=128, h=96) + GOOD_OBJECT + "</annotation>", 1, None),
        (XML_HEAD.format(w=128, h=96) + GOOD_OBJECT + "<object><name>circle</name></object></annotation>",
         1, ("warning", "object 'circle' has no <bndbox>, dropped")),
        (XML_HEAD.format(w=128, h=96) + OBJECT.format(name="circle", x1="four") + GOOD_OBJECT + "</annotation>",
         1, ("warning", "object 'circle' has a non-numeric <bndbox>, dropped")),
        (XML_HEAD.format(w="wide", h=96) + GOOD_OBJECT + "</annotation>", 1, ("warning", "non-numeric <size> 'wide' x '96' ignored")),
        (XML_HEAD.format(w=128, h=96) + OBJECT.format(name=" square ", x1=4) + "</annotation>", 1, None),
        ("<annotation></annotation>", 0, None),
        ("<annotation><size>", None, ("error", "malformed XML")),
        ('<!DOCTYPE a [<!ENTITY e "boom">]><annotation>&e;</annotation>', None, ("error", "malformed XML")),
    ],
    ids=["good", "no-bndbox", "non-numeric-box", "non-numeric-size", "padded-name", "no-objects", "truncated", "entity"],
)
def test_hand_written_xml(tmp_path: Path, xml: str, expected_boxes: int | None, expected_problem: tuple | None) -> None:
    ds = make_voc(tmp_path, n_images=1, background=0)  # img_000.jpg in train, 128x96
    xml_path = ds.root / "Annotations" / "img_000.xml"
    xml_path.write_text(xml)
    split = load_voc(ds.root, "train", CLASSES)
    assert [r.xyxy.shape[0] for r in split.records] == ([] if expected_boxes is None else [expected_boxes])
    assert [(p.severity, p.file) for p in split.problems] == ([] if expected_problem is None else [(expected_problem[0], xml_path)])
    if expected_problem is not None:
        assert expected_problem[1] in split.problems[0].message


def test_missing_split_list_raises_naming_the_file(voc_dataset: SyntheticDataset) -> None:
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/trainval\.txt: split list not found"):
        load_voc(voc_dataset.root, "trainval", CLASSES)


@pytest.mark.parametrize(
    ("split_name", "num_images", "boxes_per_class", "problems"),
    [
        ("train", 205, [2381, 214, 209], [Problem(Path("Annotations/BloodImage_00343.xml"), "zero-area box [181.0, 329.0, 181.0, 329.0] (RBC) dropped")]),
        ("val", 87, [967, 87, 83], [Problem(Path("Annotations/BloodImage_00338.xml"), "zero-area box [504.0, 337.0, 504.0, 337.0] (RBC) dropped")]),
        ("test", 72, [805, 71, 69], []),
    ],
)
def test_bccd(bccd_root: Path, split_name: str, num_images: int, boxes_per_class: list[int], problems: list[Problem]) -> None:
    split = load_voc(bccd_root, split_name, BCCD_CLASSES, "bccd")
    class_id = np.concatenate([r.class_id for r in split.records])
    assert (len(split), split.num_background) == (num_images, 0)
    assert np.bincount(class_id, minlength=3).tolist() == boxes_per_class
    assert {(r.width, r.height) for r in split.records} == {(640, 480)}
    assert list(split.problems) == [Problem(bccd_root / p.file, p.message) for p in problems]
