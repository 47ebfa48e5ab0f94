"""load_voc: synthetic sets with one injected flaw each, hand-written XML, and the real BCCD."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthetic import SPLITS, SyntheticDataset, assert_sound, make_voc, truncate
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
        ("unknown_class", ("error", "label 'hexagon' is not one of the classes (circle, square): 1 box(es) on 1 image(s) dropped")),
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
        (XML_HEAD.format(w=128, h=96) + OBJECT.format(name="circle", x1="-inf") + "</annotation>",
         0, ("error", "object 'circle' has a non-finite <bndbox> [-inf, 2.0, 20.0, 22.0], dropped")),
        (XML_HEAD.format(w=128, h=96) + OBJECT.format(name="circle", x1="nan") + "</annotation>",
         0, ("error", "object 'circle' has a non-finite <bndbox> [nan, 2.0, 20.0, 22.0], dropped")),
        (XML_HEAD.format(w="inf", h=96) + GOOD_OBJECT + "</annotation>", 1, ("warning", "non-numeric <size> 'inf' x '96' ignored")),
        ("<annotation><size>", None, ("error", "malformed XML")),
        ('<!DOCTYPE a [<!ENTITY e "boom">]><annotation>&e;</annotation>', None, ("error", "malformed XML")),
    ],
    ids=["good", "no-bndbox", "non-numeric-box", "non-numeric-size", "padded-name", "no-objects", "inf-box", "nan-box",
         "inf-size", "truncated", "entity"],
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


def test_split_list_that_is_not_utf8_raises_naming_the_file_and_byte(tmp_path: Path) -> None:
    ds = make_voc(tmp_path, n_images=1, background=0)
    ds.split_file("train").write_bytes(b"img_000\nimg_\xe9\n")
    with pytest.raises(ValueError) as caught:
        load_voc(ds.root, "train", CLASSES)
    assert str(caught.value) == (
        f"{ds.split_file('train')}: not UTF-8 text: byte 0xe9 at offset 12 (line 2): invalid continuation byte"
    )


@pytest.mark.parametrize(("image", "keep"), [("img_000.jpg", 0.5), ("img_000.jpg", 0.97), ("flaw_uppercase_png.PNG", 0.5)])
def test_truncated_image_is_an_error_and_skipped(tmp_path: Path, image: str, keep: float) -> None:
    """A cut JPEG still passes PIL's verify(); it must be decoded in full to be found."""
    ds = make_voc(tmp_path, n_images=2, background=0, extras=("uppercase_png",))
    path = truncate(ds.root / "JPEGImages" / image, keep)
    split = load_voc(ds.root, "train", CLASSES)
    [problem] = split.problems
    assert (problem.severity, problem.file) == ("error", path)
    assert problem.message.startswith("unreadable image: image file is truncated")
    assert path.name not in [r.path.name for r in split.records] and len(split.records) == 2


def test_background_images_are_counted_in_one_log_line(voc_dataset: SyntheticDataset, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.datasets.voc"):
        load_voc(voc_dataset.root, "train", CLASSES)
        load_voc(voc_dataset.root, "test", CLASSES)  # no background image: no line
    assert caplog.messages == [
        f"{voc_dataset.split_file('train')}: 1 of 13 images have no file in Annotations/ and are read as background (no objects)"
    ]


@pytest.mark.parametrize("suffix", [".XML", ".Xml"])
def test_annotation_named_in_another_case_is_a_warning_and_the_image_background(
    tmp_path: Path, suffix: str, caplog
) -> None:
    ds = make_voc(tmp_path, n_images=2, background=0)
    renamed = (ds.root / "Annotations" / "img_000.xml").rename(ds.root / "Annotations" / f"img_000{suffix}")
    with caplog.at_level(logging.WARNING, logger="trainer.datasets.voc"):
        split = load_voc(ds.root, "train", CLASSES)
    assert split.problems == (
        Problem(renamed, "not read: the annotation of image 'img_000' must be named 'img_000.xml'; read as background"),
    )
    assert [(r.image_id, r.background) for r in split.records] == [("img_000", True), ("img_001", False)]
    assert caplog.messages == [f"{ds.split_file('train')}: 1 of 2 images have no file in Annotations/ and are read as background (no objects)"]


@pytest.mark.parametrize("entry", ["../../other/JPEGImages/img_000", "{other}/JPEGImages/img_000", "JPEGImages/../../../other/JPEGImages/img_000"])
def test_split_id_that_leaves_the_dataset_root_is_refused(tmp_path: Path, entry: str) -> None:
    """Each entry names a real image (and XML) of another dataset beside this one: it must not be read."""
    ds = make_voc(tmp_path / "data", n_images=1, background=0)
    other = make_voc(tmp_path / "other", n_images=1, background=0).root
    entry = entry.format(other=other)
    ds.split_file("train").write_text(f"img_000\n{entry}\n")
    split = load_voc(ds.root, "train", CLASSES)
    assert [r.path for r in split.records] == [ds.root / "JPEGImages" / "img_000.jpg"]
    assert split.problems == (
        Problem(ds.split_file("train"), f"image id {entry!r} points outside the dataset root; skipped", "error"),
    )


# Values a careless edit or a hostile file puts in an XML text node.
NASTY_TEXT = ["", "inf", "-inf", "nan", "1e999", "-5", "0", "99999999999999999999", "1.5", " 7 ", "true", "circle",
              "hexagon", "&amp;", "&e;", "<", "]]>", "&#0;", "\x00", "<object>", "</bndbox>"]


@pytest.fixture(scope="module")
def one_voc(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """A one-image VOC set whose XML the fuzz test overwrites."""
    return make_voc(tmp_path_factory.mktemp("fuzz"), n_images=1, background=0, classes=("circle", "square"))


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.data())
def test_fuzzed_xml_never_raises_and_never_yields_a_bad_box(one_voc: SyntheticDataset, data: st.DataObject) -> None:
    xml_path = one_voc.root / "Annotations" / "img_000.xml"
    # two boxes to break, split into tags and the text between them
    xml = XML_HEAD.format(w=128, h=96) + GOOD_OBJECT + OBJECT.format(name="circle", x1=40) + "</annotation>"
    pieces = re.split(r"(<[^>]*>)", xml)
    values = [i for i, piece in enumerate(pieces) if piece and not piece.startswith("<")]  # sizes, names, corners
    for _ in range(data.draw(st.integers(1, 5), label="edits")):
        edit = data.draw(st.sampled_from(["value", "delete", "repeat", "junk"]), label="edit")
        if edit == "value":
            index = data.draw(st.sampled_from(values), label="value")
            pieces[index] = data.draw(st.sampled_from(NASTY_TEXT) | st.text(max_size=8), label="text")
            continue
        index = data.draw(st.integers(0, len(pieces) - 1), label="piece")
        if edit == "delete":
            pieces[index] = ""
        elif edit == "repeat":
            pieces[index] *= 2
        else:
            pieces[index] += data.draw(st.text(max_size=8), label="junk")
    xml_path.write_text("".join(pieces), encoding="utf-8", errors="surrogatepass")
    split = load_voc(one_voc.root, "train", CLASSES)
    assert_sound(split, one_voc.root)
    assert {p.file for p in split.problems} <= {xml_path}


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
