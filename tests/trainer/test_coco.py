"""load_coco: synthetic sets with one injected flaw each, category mapping by name, bad JSON files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthetic import SPLITS, SyntheticDataset, assert_sound, make_coco, make_voc, truncate
from trainer.datasets.coco import load_coco
from trainer.datasets.voc import load_voc

CLASSES = ("circle", "square")


def load(ds: SyntheticDataset, split_name: str, classes: tuple[str, ...] = CLASSES):
    return load_coco(ds.root, ds.split_file(split_name), classes, "synthetic", split_name)


def assert_matches(split, ds: SyntheticDataset, split_name: str) -> None:
    """The records are exactly the images the generator says this split must load, with their boxes."""
    expected = {image.file_name: image for image in ds.in_split(split_name)}
    assert sorted(r.path.name for r in split.records) == sorted(expected)
    for record in split.records:
        image = expected[record.path.name]
        assert (record.width, record.height, record.background) == (*ds.image_wh, image.background)
        np.testing.assert_array_equal(record.xyxy, np.array([o.xyxy for o in image.objects], np.float32).reshape(-1, 4))
        assert record.class_id.tolist() == [ds.classes.index(o.class_name) for o in image.objects]
        assert record.difficult.tolist() == [o.difficult for o in image.objects]


@pytest.mark.parametrize("split_name", SPLITS)
def test_clean_dataset_loads_every_image_and_box(coco_dataset: SyntheticDataset, split_name: str) -> None:
    split = load(coco_dataset, split_name)
    assert (split.dataset, split.split, split.class_names, split.problems) == ("synthetic", split_name, CLASSES, ())
    assert_matches(split, coco_dataset, split_name)


@pytest.mark.parametrize("split_name", SPLITS)
def test_same_images_as_voc_give_the_same_records(
    coco_dataset: SyntheticDataset, voc_dataset: SyntheticDataset, split_name: str
) -> None:
    """Both fixtures draw the same images; COCO's reversed category ids must not change a label."""
    coco = {r.path.name: r for r in load(coco_dataset, split_name).records}
    voc = {r.path.name: r for r in load_voc(voc_dataset.root, split_name, CLASSES).records}
    assert sorted(coco) == sorted(voc)
    for name, record in voc.items():
        np.testing.assert_array_equal(coco[name].xyxy, record.xyxy)
        assert (coco[name].class_id.tolist(), coco[name].background) == (record.class_id.tolist(), record.background)


@pytest.mark.parametrize(
    ("flaw", "expected"),
    [
        ("unknown_class", ("error", "label 'hexagon' is not one of the classes (circle, square): 1 box(es) on 1 image(s) dropped")),
        ("zero_area_box", ("warning", "image 'flaw_zero_area_box.jpg' (id 4): zero-area box")),
        ("outside_box", ("warning", "image 'flaw_outside_box.jpg' (id 4): box [113.0, 10.0, 143.0, 40.0] (square) outside the 128x96 image")),
        ("missing_image", ("error", "image 'flaw_missing_image.jpg' (id 4) not found under")),
        ("unreadable_image", ("error", "unreadable image")),
        ("size_mismatch", ("warning", "width x height 144x96 differs from the file's 128x96")),
        ("uppercase_png", None),
        ("crowd", None),  # iscrowd: 1 -> difficult, checked by assert_matches
        ("repeated_across_splits", None),
    ],
)
def test_each_flaw_gives_one_problem_in_its_file(tmp_path: Path, flaw: str, expected: tuple[str, str] | None) -> None:
    ds = make_coco(tmp_path, n_images=3, background=0, extras=(flaw,))
    split = load(ds, "train")
    if expected is None:
        assert split.problems == ()
    else:
        [problem] = split.problems
        assert (problem.severity, problem.file) == (expected[0], ds.flaw_files[flaw])
        assert expected[1] in problem.message
    assert_matches(split, ds, "train")


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding img_000.jpg (128x96), for hand-written JSON files."""
    return make_voc(tmp_path_factory.mktemp("one"), n_images=1, background=0).root / "JPEGImages"


def write_json(folder: Path, categories: list, annotations: list, images: list | None = None) -> Path:
    images = [{"id": 1, "file_name": "img_000.jpg", "width": 128, "height": 96}] if images is None else images
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def box(category: int, /, x: float = 10, **fields) -> dict:
    """One annotation of image 1, id = category; fields replace any key."""
    return {"id": category, "image_id": 1, "category_id": category, "bbox": [x, 20, 30, 40], **fields}


@pytest.mark.parametrize(
    ("categories", "expected_class_id"),
    [
        ([{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}], [0, 1]),
        ([{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}], [1, 0]),
        ([{"id": 2, "name": "square"}, {"id": 1, "name": "circle"}], [1, 0]),
        ([{"id": 90, "name": "circle"}, {"id": 7, "name": "square"}], [0, 1]),
    ],
    ids=["same-order", "swapped-ids", "listed-out-of-order", "sparse-ids"],
)
def test_categories_map_to_classes_by_name(tmp_path: Path, one_image: Path, categories: list, expected_class_id: list) -> None:
    """One box per category, in the order listed (x=10, then x=50): the label follows the name, whatever the id."""
    ids = [c["id"] for c in categories]
    ann_file = write_json(tmp_path, categories, [box(ids[0], x=10), box(ids[1], x=50)])
    split = load_coco(one_image, ann_file, CLASSES)
    [record] = split.records
    assert (split.dataset, split.split, split.problems) == ("coco", "instances", ())  # split named after the JSON file
    assert record.class_id.tolist() == expected_class_id
    np.testing.assert_array_equal(record.xyxy, [[10, 20, 40, 60], [50, 20, 80, 60]])


CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


@pytest.mark.parametrize(
    ("categories", "annotations", "images", "expected_boxes", "expected_problem"),
    [
        (CATEGORIES, [box(1, bbox=[1, 2, 3])], None, [0], ("warning", "annotation 1: bbox [1, 2, 3] is not [x, y, w, h]; dropped")),
        (CATEGORIES, [box(1, bbox="10 20 30 40")], None, [0], ("warning", "is not [x, y, w, h]")),
        (CATEGORIES, [box(1, category_id=5)], None, [0], ("warning", "annotation 1: category_id 5 is not in categories; dropped")),
        (CATEGORIES, [box(1), box(2, image_id=7)], None, [1], ("warning", "1 annotation(s) of image id 7, which is not in images; dropped")),
        (CATEGORIES, [{"id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}], None, [0], ("warning", "needs an image_id; dropped")),
        (CATEGORIES[:1], [box(1)], None, [1], ("warning", "class 'square' has no COCO category (categories: circle)")),
        ([*CATEGORIES, {"name": "triangle"}], [box(1)], None, [1], ("error", "needs an integer id and a name; ignored")),
        (CATEGORIES, [], [{"id": 1}], [], ("error", "needs an id and a file_name; skipped")),
        (CATEGORIES, [box(1)], [{"id": 1, "file_name": "img_000.jpg"}] * 2, [1], ("error", "image id 1 repeated; skipped")),
        (CATEGORIES, [box(1)], [{"id": 1, "file_name": "img_000.jpg"}], [1], None),  # width/height are optional
        (CATEGORIES, [box(1, bbox=[-10, -10, 30, 30])], None, [1], ("warning", "box [-10.0, -10.0, 20.0, 20.0] (circle) outside")),
        (CATEGORIES, [box(1, bbox=[10, 20, float("inf"), 40])], None, [0],
         ("error", "annotation 1 of image 'img_000.jpg' (id 1): bbox [10, 20, inf, 40] is not finite; dropped")),
        (CATEGORIES, [box(1, bbox=[float("-inf"), 20, 30, 40])], None, [0], ("error", "bbox [-inf, 20, 30, 40] is not finite")),
        (CATEGORIES, [box(1, bbox=[10, float("nan"), 30, 40])], None, [0], ("error", "bbox [10, nan, 30, 40] is not finite")),
        (CATEGORIES, [box(1, bbox=[10, 20, 10**400, 40])], None, [0], ("error", "0, 40] is not finite; dropped")),
        (CATEGORIES, [box(1, bbox=[True, 20, 30, 40])], None, [0], ("warning", "annotation 1: bbox [True, 20, 30, 40] is not [x, y, w, h]")),
        (CATEGORIES, [box(1)], [{"id": 1, "file_name": "../JPEGImages/img_000.jpg"}], [],
         ("error", "image '../JPEGImages/img_000.jpg' (id 1): file_name points outside")),
    ],
    ids=["short-bbox", "string-bbox", "unknown-category-id", "unknown-image-id", "no-image-id", "class-without-category",
         "category-without-id", "image-without-file-name", "repeated-image-id", "no-width-height", "negative-corner",
         "infinite-width", "infinite-x", "nan-y", "huge-int", "boolean-in-bbox", "file-name-outside"],
)
def test_bad_entries_become_problems(
    tmp_path: Path, one_image: Path, categories, annotations, images, expected_boxes, expected_problem
) -> None:
    ann_file = write_json(tmp_path, categories, annotations, images)
    split = load_coco(one_image, ann_file, CLASSES)
    assert [len(r.xyxy) for r in split.records] == expected_boxes
    assert [(p.severity, p.file) for p in split.problems] == ([] if expected_problem is None else [(expected_problem[0], ann_file)])
    if expected_problem is not None:
        assert expected_problem[1] in split.problems[0].message


@pytest.mark.parametrize(
    ("annotations", "expected_background"),
    [
        ([], True),
        ([box(1)], False),
        ([box(1, category_id=3)], False),  # annotated, though only with a category the experiment does not train
    ],
    ids=["no-annotation", "annotated", "only-other-categories"],
)
def test_background_means_no_annotation_at_all(tmp_path: Path, one_image: Path, annotations, expected_background) -> None:
    ann_file = write_json(tmp_path, [*CATEGORIES, {"id": 3, "name": "hexagon"}], annotations)
    [record] = load_coco(one_image, ann_file, CLASSES).records
    assert record.background == expected_background


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "COCO annotation file not found"),
        (b"{not json", ValueError, "invalid JSON at line 1, column 2"),
        (b"", ValueError, "invalid JSON at line 1, column 1"),
        (b"\xff\xfe\x00", ValueError, "not UTF-8 text: byte 0xff at offset 0 (line 1): invalid start byte"),
        (b"[" * 100_000, ValueError, "unreadable JSON: maximum recursion depth exceeded"),
        (b'{"images": [], "annotations": [], "categories": [], "n": ' + b"7" * 5000 + b"}", ValueError,
         "unreadable JSON: Exceeds the limit (4300 digits) for integer string conversion"),
        (b"[]", ValueError, "expected a JSON object with images, annotations and categories"),
        (b'{"images": [], "categories": []}', ValueError, "'annotations' is missing or not a list"),
        (b'{"images": {}, "annotations": [], "categories": []}', ValueError, "'images' is missing or not a list"),
    ],
    ids=["missing", "not-json", "empty", "not-utf8", "deep", "huge-int", "array", "no-annotations", "images-not-list"],
)
def test_unusable_json_raises_naming_the_file(tmp_path: Path, content: bytes | None, error: type, message: str) -> None:
    ann_file = tmp_path / "instances_train.json"
    if content is not None:
        ann_file.write_bytes(content)
    with pytest.raises(error) as caught:
        load_coco(tmp_path, ann_file, CLASSES)
    assert str(caught.value).startswith(f"{ann_file}: {message}")


def test_file_name_that_is_absolute_is_refused(tmp_path: Path, one_image: Path) -> None:
    file_name = str(one_image / "img_000.jpg")  # a real image: it must not be read all the same
    ann_file = write_json(tmp_path, CATEGORIES, [box(1)], [{"id": 1, "file_name": file_name}])
    split = load_coco(tmp_path, ann_file, CLASSES)
    assert split.records == ()
    assert [(p.severity, p.file, p.message) for p in split.problems] == [
        ("error", ann_file, f"image {file_name!r} (id 1): file_name points outside {tmp_path}; skipped"),
    ]


@pytest.mark.parametrize(
    ("categories", "annotations", "images", "expected_boxes", "expected_problems"),
    [
        ([{"id": True, "name": "circle"}, *CATEGORIES[1:]], [box(2)], None, [1], [
            ("error", "category {'id': True, 'name': 'circle'} needs an integer id and a name; ignored"),
            ("warning", "class 'circle' has no COCO category (categories: square)"),
        ]),
        (CATEGORIES, [box(1, category_id=True)], None, [0], [
            ("warning", "annotation 1: category_id True is not in categories; dropped"),
        ]),
        (CATEGORIES, [box(1, image_id=True)], None, [0], [
            ("warning", "annotation {'id': 1, 'image_id': True, 'category_id': 1, 'bbox': [10, 20, 30, 40]} needs an image_id; dropped"),
        ]),
        (CATEGORIES, [box(1)], [{"id": True, "file_name": "img_000.jpg"}], [], [
            ("error", "image entry {'id': True, 'file_name': 'img_000.jpg'} needs an id and a file_name; skipped"),
            ("warning", "1 annotation(s) of image id 1, which is not in images; dropped"),
        ]),
    ],
    ids=["category-id", "category_id", "image_id", "image-id"],
)
def test_a_boolean_is_not_an_id(
    tmp_path: Path, one_image: Path, categories, annotations, images, expected_boxes: list, expected_problems: list
) -> None:
    """Python counts True as 1: each of these was read as id 1."""
    ann_file = write_json(tmp_path, categories, annotations, images)
    split = load_coco(one_image, ann_file, CLASSES)
    assert [len(r.xyxy) for r in split.records] == expected_boxes
    assert [(p.severity, p.file, p.message) for p in split.problems] == [(s, ann_file, m) for s, m in expected_problems]


def test_category_id_listed_twice_is_refused(tmp_path: Path, one_image: Path) -> None:
    """Every 'square' box would have been read as a 'circle' (or the other way round)."""
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 1, "name": "square"}]
    ann_file = write_json(tmp_path, categories, [box(1), box(2)])
    with pytest.raises(ValueError) as caught:
        load_coco(one_image, ann_file, CLASSES)
    assert str(caught.value) == (
        f"{ann_file}: category id 1 is listed twice ('circle' and 'square'); its annotations cannot be told apart"
    )


@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_image_is_an_error_and_skipped(tmp_path: Path, keep: float) -> None:
    ds = make_coco(tmp_path, n_images=2, background=0)
    path = truncate(ds.root / "img_000.jpg", keep)
    split = load(ds, "train")
    [problem] = split.problems
    assert (problem.severity, problem.file) == ("error", path)
    assert problem.message.startswith("unreadable image: image file is truncated")
    assert [r.path.name for r in split.records] == ["img_001.jpg"]


# JSON values for the fuzz test: what a buggy exporter or a hand edit leaves where a value was.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**310) | st.floats()
    | st.text(max_size=6) | st.sampled_from(["img_000.jpg", "../img_000.jpg", "/etc/hostname", "circle", "square", ""]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# the values that were read as numbers they are not (True as 1, inf clipped to the image edge) or crashed the reader
TRAPS = st.sampled_from([True, False, 10**400, float("inf"), float("-inf"), float("nan"), -1, 0, 1, 2, "1", None])


def _places(value, path: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) into a JSON document, the root included."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [path, *(place for key, item in children for place in _places(item, (*path, key)))]


def _at(document, path):
    for part in path:
        document = document[part]
    return document


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.data())
def test_fuzzed_json_is_read_or_refused_naming_the_file(one_image: Path, data: st.DataObject) -> None:
    """Any mutation of a valid file: a split whose boxes are sound and whose problems name its files, or an
    error naming the JSON file; never another exception."""
    document = {
        "images": [{"id": 1, "file_name": "img_000.jpg", "width": 128, "height": 96}],
        "annotations": [box(1), box(2, x=50, iscrowd=0)],
        "categories": copy.deepcopy(CATEGORIES),
    }
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        places = _places(document)[1:]
        if not places:  # every key deleted: nothing left to edit
            break
        leaves = [place for place in places if not isinstance(_at(document, place), (dict, list))]
        *parent_path, key = data.draw(st.sampled_from(leaves or places) | st.sampled_from(places), label="place")
        parent = _at(document, parent_path)
        edit = data.draw(st.sampled_from(["replace", "delete", "repeat"]), label="edit")
        if edit == "replace":
            parent[key] = data.draw(TRAPS | JSON_VALUES, label="value")
        elif edit == "delete":
            del parent[key]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
    folder = one_image.parent
    ann_file = folder / "fuzz.json"
    ann_file.write_text(json.dumps(document))
    try:
        split = load_coco(one_image, ann_file, CLASSES)
    except ValueError as exc:
        assert str(exc).startswith(f"{ann_file}: "), exc
        return
    assert_sound(split, folder)
