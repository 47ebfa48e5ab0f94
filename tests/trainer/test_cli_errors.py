"""Bad experiments, datasets and inputs through the `trainer` CLI: the exit code, a line naming the file and field, no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from synthetic import bccd_subset, make_coco, make_voc, write_experiment
from trainer.cli import app

runner = CliRunner()
BCCD_CLASSES = ("RBC", "WBC", "Platelets")
SHIPPED = Path(__file__).parents[2] / "models" / "bccd-nano.bundle"


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"classes": ["circle", ""]}, "classes", "class name '' is empty"),
        ({"classes": ["circle", " square"]}, "classes", "has blanks around it"),
        ({"model": {"input_hw": [65536, 65536]}}, "model.input_hw", "multiples of 32 from 64 to 4096"),
        ({"augment": {"mosaic_scale": [2, 1]}}, "augment.mosaic_scale", "0 < low <= high <= 10"),
        ({"augment": {"mosaic_scale": [-1, 0]}}, "augment.mosaic_scale", "0 < low <= high <= 10"),
        ({"augment": {"mixup_scale": [0, 1]}}, "augment.mixup_scale", "0 < low <= high <= 10"),
        ({"dataset": {"ignore_labels": ["circle"]}}, "", "dataset.ignore_labels names classes that are trained"),
    ],
    ids=["empty-class", "blank-class", "input-hw-65536", "mosaic-2-1", "mosaic-negative", "mixup-0", "ignore-a-class"],
)
@pytest.mark.parametrize("command", ["check-dataset", "train"])
def test_bad_experiment_is_exit_2_naming_file_and_field(voc_dataset, tmp_path, command, overrides, field, message):
    overrides = dict(overrides)  # parametrize shares the dict between the two commands
    classes = overrides.pop("classes", voc_dataset.classes)
    config = write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", classes, **overrides)
    result = _invoke(command, config)
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if message in line]
    assert f"{config}:" in line and field in line


def _folder_xml(ds) -> Path:
    xml = ds.root / "Annotations" / "img_000.xml"
    xml.unlink()
    xml.mkdir()
    return xml


def _device_xml(ds) -> Path:
    xml = ds.root / "Annotations" / "img_000.xml"
    xml.unlink()
    xml.symlink_to(os.devnull)
    return xml


def _duplicate_coco_annotation(ds) -> Path:
    document = json.loads(ds.split_file("train").read_text())
    document["annotations"].append(dict(document["annotations"][0]))
    ds.split_file("train").write_text(json.dumps(document))
    return ds.split_file("train")


@pytest.mark.parametrize(
    ("make", "flaw", "message"),
    [
        (make_voc, _folder_xml, "not a regular file (a folder or a device); image skipped"),
        (make_voc, _device_xml, "not a regular file (a folder or a device); image skipped"),
        (make_coco, _duplicate_coco_annotation, "is used twice"),
    ],
    ids=["xml-folder", "xml-device", "coco-duplicate-annotation"],
)
def test_bad_annotation_file_is_an_error_naming_it(tmp_path, make, flaw, message):
    ds = make(tmp_path / "data", n_images=6, background=0)
    bad_file = flaw(ds)
    config = write_experiment(tmp_path / "exp.yaml", ds.root, ds.format, ds.classes)
    check = _invoke("check-dataset", config)
    assert check.exit_code == 1
    assert message in check.output and bad_file.name in check.output
    train = _invoke("train", config)
    assert train.exit_code == 1
    [line] = [line for line in train.output.splitlines() if line.startswith("error:")]
    assert f"{bad_file}: " in line and message in line and "training refused" in line


@pytest.mark.parametrize("make_bad", [lambda path: path.mkdir(), lambda path: path.symlink_to(os.devnull)],
                         ids=["folder", "device"])
@pytest.mark.parametrize("make", [make_voc, make_coco])
def test_a_split_file_that_is_a_folder_or_device_is_an_error_naming_it(tmp_path, make, make_bad):
    ds = make(tmp_path / "data", n_images=6, background=0)
    ds.split_file("val").unlink()
    make_bad(ds.split_file("val"))
    config = write_experiment(tmp_path / "exp.yaml", ds.root, ds.format, ds.classes)
    check = _invoke("check-dataset", config)
    assert check.exit_code == 1 and "val split not read" in check.output and "not a regular file" in check.output
    train = _invoke("train", config)
    assert train.exit_code == 1
    [line] = [line for line in train.output.splitlines() if line.startswith("error:")]
    assert f"{ds.split_file('val')}: " in line and "is not a regular file (a folder or a device)" in line


def test_a_misspelt_class_is_an_error_with_its_count_and_a_guess(tmp_path):
    """The raccoon case: `classes: [racoon]` against `raccoon` boxes used to train on nothing."""
    ds = make_voc(tmp_path / "data", n_images=6, background=0, classes=("raccoon",))
    config = write_experiment(tmp_path / "exp.yaml", ds.root, "voc", ("racoon",))
    boxes = sum(len(image.objects) for image in ds.in_split("train"))
    check = _invoke("check-dataset", config)
    assert check.exit_code == 1
    assert f"label 'raccoon' is not one of the classes (racoon): {boxes} box(es)" in check.output
    assert "did you mean 'racoon'?" in check.output
    assert "class 'racoon' has no box in the train split" in check.output
    train = _invoke("train", config)
    assert train.exit_code == 1 and "did you mean 'racoon'?" in train.output and "training refused" in train.output
    assert not (tmp_path / "runs" / "synthetic" / "last.pth").exists()
    ignored = write_experiment(tmp_path / "ignored.yaml", ds.root, "voc", ("racoon",), dataset={"ignore_labels": ["raccoon"]})
    assert "is not one of the classes" not in _invoke("check-dataset", ignored).output  # dropped knowingly


def test_an_all_background_train_split_refuses_to_train(tmp_path):
    ds = make_voc(tmp_path / "data", n_images=4, background=0)
    for xml in (ds.root / "Annotations").iterdir():
        xml.unlink()
    config = write_experiment(tmp_path / "exp.yaml", ds.root, "voc", ds.classes)
    train = _invoke("train", config)
    assert train.exit_code == 1
    assert "images of the train split are background (no box)" in train.output
    assert _invoke("check-dataset", config).exit_code == 1


@pytest.fixture(scope="module")
def bccd_bundle() -> Path:
    if not (SHIPPED / "bundle.json").is_file():
        pytest.skip(f"no shipped bundle at {SHIPPED}")
    return SHIPPED


def test_eval_and_train_name_a_missing_image_and_eval_says_it_evaluates_a_subset(bccd_root, bccd_bundle, tmp_path):
    root = bccd_subset(bccd_root, tmp_path / "bccd", {"train": 4, "val": 2, "test": 3})
    missing = (root / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    (root / "JPEGImages" / f"{missing}.jpg").unlink()
    config = write_experiment(tmp_path / "exp.yaml", root, "voc", BCCD_CLASSES, dataset={"train": "test"})
    result = _invoke("eval", bccd_bundle, "--data", config, "--out", tmp_path / "eval")
    assert result.exit_code == 0
    assert f"image {missing!r} listed but not found in JPEGImages/" in result.output
    assert "evaluating a subset: 2 of the 3 images the test split names (1 skipped" in result.output
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["num_skipped"] == 1
    train = _invoke("train", config)
    assert train.exit_code == 1 and f"image {missing!r} listed but not found" in train.output


def test_predict_names_an_image_no_letterbox_can_take_and_fails_when_every_input_failed(bccd_root, bccd_bundle, tmp_path):
    thin = tmp_path / "thin.png"
    cv2.imwrite(str(thin), np.full((1, 5000, 3), 128, np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    alone = _invoke("predict", bccd_bundle, thin, broken, "-o", tmp_path / "out1")
    assert alone.exit_code == 1
    assert f"{thin}: a 5000x1 image cannot be letterboxed into 416x416" in alone.output
    assert "every input failed (2)" in alone.output
    good = bccd_root / "JPEGImages" / "BloodImage_00001.jpg"
    mixed = _invoke("predict", bccd_bundle, good, thin, "-o", tmp_path / "out2")
    assert mixed.exit_code == 0
    output = json.loads(mixed.stdout[mixed.stdout.index("{"):])
    assert output["num_images"] == 1 and [f.split(": ")[0] for f in output["failed"]] == [str(thin)]
