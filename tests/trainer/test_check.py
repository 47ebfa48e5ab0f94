"""check_dataset and print_report: counts per split and class, every problem with its file, errors first."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from synthetic import FLAWS, SPLITS, SyntheticDataset, make_coco, make_voc, truncate, write_experiment
from trainer.cli import app
from trainer.config import Experiment, load_experiment
from trainer.datasets.check import BoxSizeStats, DatasetReport, SplitStats, check_dataset, print_report, split_source
from trainer.datasets.records import Problem

MAKE = {"voc": make_voc, "coco": make_coco}


def experiment(tmp_path: Path, ds: SyntheticDataset, **overrides) -> Experiment:
    return load_experiment(write_experiment(tmp_path / "exp.yaml", ds.root, ds.format, ds.classes, **overrides))


def expected_stats(ds: SyntheticDataset, split: str) -> tuple[int, int, tuple[int, ...]]:
    """(images, background images, boxes per class) the generator put in a split."""
    images = ds.in_split(split)
    boxes = Counter(o.class_name for image in images for o in image.objects)
    return len(images), sum(image.background for image in images), tuple(boxes[name] for name in ds.classes)


def rendered(report: DatasetReport) -> str:
    console = Console(record=True, width=240)
    print_report(report, console)
    return console.export_text()


@pytest.mark.parametrize("fixture", ["voc_dataset", "coco_dataset"])
def test_clean_dataset_has_no_problems_and_counts_every_box(tmp_path: Path, request, fixture: str) -> None:
    ds = request.getfixturevalue(fixture)
    report = check_dataset(experiment(tmp_path, ds))
    assert (report.dataset, report.format, report.class_names) == (f"synthetic-{ds.format}", ds.format, ds.classes)
    assert (report.num_errors, report.num_warnings, report.problems) == (0, 0, ())
    assert [s.split for s in report.splits] == list(SPLITS)
    for stats in report.splits:
        assert (stats.num_images, stats.num_background, stats.boxes_per_class) == expected_stats(ds, stats.split)
        assert stats.num_boxes == sum(stats.boxes_per_class)
        assert stats.image_sizes == ((128, 96, stats.num_images),)
        assert 21 <= stats.box_sizes.min_wh_px[0] <= stats.box_sizes.median_wh_px[0] <= stats.box_sizes.max_wh_px[0] <= 41


@pytest.mark.parametrize(
    ("format", "flaws", "num_errors", "num_warnings"),
    [
        ("voc", FLAWS, 4, 4),  # malformed XML, missing and unreadable image, unknown label; zero-area, outside, size, repeated
        ("coco", tuple(f for f in FLAWS if f != "malformed_xml"), 3, 4),
    ],
)
def test_every_flaw_is_reported_with_its_file_errors_first(
    tmp_path: Path, format: str, flaws: tuple[str, ...], num_errors: int, num_warnings: int
) -> None:
    ds = MAKE[format](tmp_path / "data", n_images=10, extras=flaws)
    report = check_dataset(experiment(tmp_path, ds))
    assert (report.num_errors, report.num_warnings) == (num_errors, num_warnings)
    severities = [p.severity for p in report.problems]
    assert severities == sorted(severities, key=lambda s: s != "error")
    silent = {"uppercase_png", "crowd"}
    assert {p.file for p in report.problems} == {ds.flaw_files[f] for f in flaws if f not in silent}
    train = next(s for s in report.splits if s.split == "train")
    assert train.num_difficult == 1  # the crowd flaw


@pytest.mark.parametrize(
    ("format", "break_split", "expected_message"),
    [
        ("voc", lambda ds: ds.split_file("test").unlink(), "test split not read: split list not found"),
        ("coco", lambda ds: ds.split_file("test").unlink(), "test split not read: COCO annotation file not found"),
        ("coco", lambda ds: ds.split_file("test").write_text("{"), "test split not read: invalid JSON at line 1"),
    ],
    ids=["voc-no-list", "coco-no-json", "coco-bad-json"],
)
def test_unreadable_split_is_an_error_not_a_crash(tmp_path: Path, format: str, break_split, expected_message: str) -> None:
    ds = MAKE[format](tmp_path / "data", n_images=10, background=0)
    break_split(ds)
    exp = experiment(tmp_path, ds)
    report = check_dataset(exp)
    assert [s.split for s in report.splits] == ["train", "val"]
    [problem] = report.problems
    assert (problem.severity, problem.file) == ("error", split_source(exp, "test"))
    assert problem.message.startswith(expected_message)
    assert "test split not read" in rendered(report)


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        ({"train": "0 1", "val": "2", "test": "3"}, []),
        ({"train": "0 1", "val": "1 2", "test": "3"}, [(1, "in more than one split: train, val")]),
        ({"train": "0 1", "val": "2", "test": "0 3"}, [(0, "in more than one split: train, test")]),
        ({"train": "0 1 0", "val": "2", "test": "3"}, [(0, "listed 2 times in the train split")]),
        ({"train": "0 1", "val": "2", "test": "0 1 2 3"},
         [(0, "in more than one split: train, test"), (1, "in more than one split: train, test"),
          (2, "in more than one split: val, test")]),
    ],
    ids=["disjoint", "train-val", "train-test", "twice-in-train", "test-is-everything"],
)
def test_images_shared_between_splits_are_warnings(tmp_path: Path, lists: dict[str, str], expected: list) -> None:
    """lists: image numbers per split, rewritten over a 4-image one-class set."""
    ds = make_voc(tmp_path / "data", n_images=4, background=0, classes=("circle",))
    for split, numbers in lists.items():
        ds.split_file(split).write_text("".join(f"img_{int(n):03d}\n" for n in numbers.split()))
    report = check_dataset(experiment(tmp_path, ds))
    assert [(p.severity, p.file, p.message) for p in report.problems] == [
        ("warning", ds.root / "JPEGImages" / f"img_{n:03d}.jpg", message) for n, message in expected
    ]


@pytest.mark.parametrize(
    ("classes", "n_images", "expected"),
    [
        (("circle", "square"), 10, []),
        (("circle", "square", "triangle"), 1, [("train", "class 'square' has no box in the train split", "error"),
                                               ("train", "class 'triangle' has no box in the train split", "error"),
                                               ("val", "the val split has no images", "warning"),
                                               ("test", "the test split has no images", "warning")]),
    ],
)
def test_empty_split_and_class_without_boxes(tmp_path: Path, classes, n_images: int, expected: list) -> None:
    """A class with no box in train is an error (nothing to learn it from, e.g. a typo in classes); elsewhere a warning."""
    ds = make_voc(tmp_path / "data", n_images=n_images, background=0, classes=classes)
    exp = experiment(tmp_path, ds)
    report = check_dataset(exp)
    assert report.problems == tuple(Problem(split_source(exp, split), message, sev) for split, message, sev in expected)


def test_report_prints_counts_problems_and_verdict(tmp_path: Path) -> None:
    ds = make_voc(tmp_path / "data", n_images=10, background=1, classes=("circle", "[sq]"), extras=("missing_image", "outside_box"))
    text = rendered(check_dataset(experiment(tmp_path, ds)))
    for fragment in (
        "synthetic-voc",
        "circle", "[sq]",  # a class name that looks like rich markup is shown as is
        "ImageSets/Main/train.txt",
        "128x96 (8)",  # 6 drawn, 1 background, 1 flawed
        "image 'flaw_missing_image' listed but not found",
        "Annotations/flaw_outside_box.xml",
        "errors: 1 error(s), 1 warning(s)",
    ):
        assert fragment in text
    assert text.index("error ") < text.index("warning ")


@pytest.mark.parametrize(
    ("image_sizes", "expected"),
    [
        ((), "-"),
        (((640, 480, 7),), "640x480 (7)"),
        (tuple((w, 480, 1) for w in (640, 320, 800, 1024, 1280, 100)),
         "640x480 (1), 320x480 (1), 800x480 (1), 1024x480 (1) and 2 more; widths 100-1280, heights 480-480"),
    ],
    ids=["none", "one", "six"],
)
def test_report_shows_at_most_four_image_sizes(tmp_path: Path, image_sizes: tuple, expected: str) -> None:
    box_sizes = BoxSizeStats((1.0, 2.0), (3.0, 4.0), (5.0, 6.0))
    stats = SplitStats("train", tmp_path / "train.txt", len(image_sizes), 0, (0,), 0, image_sizes, box_sizes)
    text = rendered(DatasetReport("d", "voc", tmp_path, ("a",), (stats,), ()))
    assert expected in text
    assert "1x2" in text and "3x4" in text and "5x6" in text
    assert "ok: 0 error(s), 0 warning(s)" in text


def test_splits_reading_the_same_file_report_its_problems_once(tmp_path: Path) -> None:
    ds = make_voc(tmp_path / "data", n_images=10, extras=("zero_area_box",))
    report = check_dataset(experiment(tmp_path, ds, dataset={"val": "train", "test": "train"}))
    assert [s.split for s in report.splits] == list(SPLITS)
    assert sum("zero-area box" in p.message for p in report.problems) == 1


def test_write_experiment_overrides_merge_into_sections(tmp_path: Path, voc_dataset: SyntheticDataset) -> None:
    exp = experiment(tmp_path, voc_dataset, name="other", train={"epochs": 3}, model={"input_hw": [64, 64]})
    assert (exp.name, exp.train.epochs, exp.train.batch_size, exp.model.input_hw) == ("other", 3, 4, (64, 64))
    assert (exp.dataset.root, exp.output_dir) == (voc_dataset.root, tmp_path / "runs")


def test_bccd_has_three_classes_two_zero_area_boxes_and_no_errors(bccd_root: Path) -> None:
    exp = Experiment(
        name="bccd", classes=("RBC", "WBC", "Platelets"), dataset={"name": "bccd", "format": "voc", "root": bccd_root}
    )
    report = check_dataset(exp)
    assert [(s.split, s.num_images, s.num_background, s.boxes_per_class) for s in report.splits] == [
        ("train", 205, 0, (2381, 214, 209)),
        ("val", 87, 0, (967, 87, 83)),
        ("test", 72, 0, (805, 71, 69)),
    ]
    assert all(s.image_sizes == ((640, 480, s.num_images),) for s in report.splits)
    assert report.num_errors == 0
    assert [(p.severity, p.file.name, p.message) for p in report.problems] == [
        ("warning", "BloodImage_00343.xml", "zero-area box [181.0, 329.0, 181.0, 329.0] (RBC) dropped"),
        ("warning", "BloodImage_00338.xml", "zero-area box [504.0, 337.0, 504.0, 337.0] (RBC) dropped"),
    ]



@pytest.mark.parametrize(("format", "image"), [("voc", "JPEGImages/img_001.jpg"), ("coco", "img_001.jpg")])
def test_truncated_image_is_an_error(tmp_path: Path, format: str, image: str) -> None:
    """PIL's verify() passes a cut JPEG; training would then learn from its grey half."""
    ds = MAKE[format](tmp_path / "data", n_images=10, background=0)
    path = truncate(ds.root / image)
    report = check_dataset(experiment(tmp_path, ds))
    assert [(p.severity, p.file) for p in report.problems] == [("error", path)]
    assert report.problems[0].message.startswith("unreadable image: image file is truncated")


def test_background_images_are_counted_and_a_misnamed_annotation_is_a_warning(tmp_path: Path) -> None:
    ds = make_voc(tmp_path / "data", n_images=10, background=2)
    renamed = (ds.root / "Annotations" / "img_000.xml").rename(ds.root / "Annotations" / "img_000.XML")
    report = check_dataset(experiment(tmp_path, ds))
    assert [s.num_background for s in report.splits] == [2, 1, 0]  # img_000 (train) and the two generated ones
    assert report.problems == (
        Problem(renamed, "not read: the annotation of image 'img_000' must be named 'img_000.xml'; read as background"),
    )
    assert "3 background image(s) without annotation (train 2, val 1): trained as images with no objects" in rendered(report)


runner = CliRunner()


def test_cli_exits_1_on_errors_without_a_stray_error_line_and_never_cuts_a_line(tmp_path: Path) -> None:
    """Output to a log or pipe (not a terminal) was cut at 80 columns, and `error: 1` followed the report."""
    ds = make_voc(tmp_path / "data", n_images=10, background=0, extras=("missing_image",))
    (ds.root / "Annotations" / "img_000.xml").rename(ds.root / "Annotations" / "img_000.XML")
    result = runner.invoke(app, ["check-dataset", str(write_experiment(tmp_path / "exp.yaml", ds.root, "voc", ds.classes))])
    assert result.exit_code == 1
    assert "error:" not in result.stderr
    for line in (
        "not read: the annotation of image 'img_000' must be named 'img_000.xml'; read as background",
        "image 'flaw_missing_image' listed but not found in JPEGImages/",
        "errors: 1 error(s), 1 warning(s)",
    ):
        assert line in result.stdout


def test_cli_exits_0_for_a_clean_dataset(tmp_path: Path, voc_dataset: SyntheticDataset) -> None:
    result = runner.invoke(app, ["check-dataset", str(write_experiment(tmp_path / "exp.yaml", voc_dataset.root, "voc", voc_dataset.classes))])
    assert (result.exit_code, result.stderr) == (0, "")
    assert "ok: 0 error(s), 0 warning(s)" in result.stdout
