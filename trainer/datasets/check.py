"""`trainer check-dataset`: read every split as training would, summarise it, list every problem.

The report is built first (`check_dataset`, no printing) and printed after
(`print_report`), so tests check numbers and the CLI derives its exit status
from `DatasetReport.num_errors`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from trainer.config import Experiment
from trainer.datasets import load_split
from trainer.datasets.records import DatasetSplit, Problem

SPLITS = ("train", "val", "test")
MAX_SIZES_SHOWN = 4
# Columns when the report goes to a file or a pipe (a log): rich would cut every table at 80.
UNCUT_WIDTH = 1000


@dataclass(frozen=True, slots=True)
class BoxSizeStats:
    """Box width and height in image pixels over one split (all zero when it has no boxes)."""

    min_wh_px: tuple[float, float]
    median_wh_px: tuple[float, float]
    max_wh_px: tuple[float, float]

    @classmethod
    def of(cls, wh_px: np.ndarray) -> BoxSizeStats:
        """wh_px: float [N, 2] box (width, height) in pixels."""
        if len(wh_px) == 0:
            return cls((0.0, 0.0), (0.0, 0.0), (0.0, 0.0))
        return cls(_wh(wh_px.min(axis=0)), _wh(np.median(wh_px, axis=0)), _wh(wh_px.max(axis=0)))


def _wh(values: np.ndarray) -> tuple[float, float]:
    return round(float(values[0]), 1), round(float(values[1]), 1)


@dataclass(frozen=True, slots=True)
class SplitStats:
    """What one loaded split holds.

    boxes_per_class: box count per class, in the experiment's label order.
    image_sizes: distinct (width, height, image count), most frequent first.
    """

    split: str
    source: Path
    num_images: int
    num_background: int
    boxes_per_class: tuple[int, ...]
    num_difficult: int
    image_sizes: tuple[tuple[int, int, int], ...]
    box_sizes: BoxSizeStats

    @property
    def num_boxes(self) -> int:
        return sum(self.boxes_per_class)


@dataclass(frozen=True, slots=True)
class DatasetReport:
    """The experiment's dataset: one SplitStats per split that could be read, and every problem, errors first."""

    dataset: str
    format: str
    root: Path
    class_names: tuple[str, ...]
    splits: tuple[SplitStats, ...]
    problems: tuple[Problem, ...]

    @property
    def num_errors(self) -> int:
        return sum(p.severity == "error" for p in self.problems)

    @property
    def num_warnings(self) -> int:
        return sum(p.severity == "warning" for p in self.problems)


def split_source(exp: Experiment, split: str) -> Path:
    """The file a split is read from: the VOC list file or the COCO JSON file."""
    ds = exp.dataset
    if ds.format == "voc":
        return ds.root / "ImageSets" / "Main" / f"{ds.split(split)}.txt"
    return ds.root / ds.split(split)


def _split_stats(split: str, source: Path, data: DatasetSplit) -> SplitStats:
    """Counts and sizes of one loaded split."""
    class_id = np.concatenate([r.class_id for r in data.records]) if data.records else np.zeros(0, np.int64)
    xyxy = np.concatenate([r.xyxy for r in data.records]) if data.records else np.zeros((0, 4), np.float32)
    sizes = Counter((r.width, r.height) for r in data.records)
    return SplitStats(
        split=split,
        source=source,
        num_images=len(data),
        num_background=data.num_background,
        boxes_per_class=tuple(int(n) for n in np.bincount(class_id, minlength=len(data.class_names))),
        num_difficult=int(sum(r.difficult.sum() for r in data.records)),
        image_sizes=tuple((w, h, n) for (w, h), n in sizes.most_common()),
        box_sizes=BoxSizeStats.of(xyxy[:, 2:] - xyxy[:, :2]),
    )


def coverage_problems(split: str, source: Path, data: DatasetSplit) -> list[Problem]:
    """A split with no image, with background images only, or with a class that has no box.

    In the train split these are errors (there is nothing to learn the class
    from: a typo in `classes` ends here); in val and test, warnings.
    """
    severity = "error" if split == "train" else "warning"
    if not len(data):
        return [Problem(source, f"the {split} split has no images", severity)]
    if data.num_background == len(data):
        return [Problem(source, f"all {len(data)} images of the {split} split are background (no box)", severity)]
    counts = np.bincount(np.concatenate([r.class_id for r in data.records]), minlength=len(data.class_names))
    return [
        Problem(source, f"class {name!r} has no box in the {split} split", severity)
        for name, n in zip(data.class_names, counts)
        if n == 0
    ]


def rotated_problems(split: str, data: DatasetSplit) -> list[Problem]:
    """A warning naming the first of the split's images stored rotated (EXIF orientation), with their count; none when none is."""
    rotated = [r for r in data.records if r.orientation != 1]
    if not rotated:
        return []
    message = (
        f"{len(rotated)} image(s) of the {split} split are stored rotated (EXIF orientation {rotated[0].orientation} "
        "here): read turned as displayed, as labelling tools show them, so their boxes must be in that frame"
    )
    return [Problem(rotated[0].path, message)]


def _repeated_images(loaded: dict[str, DatasetSplit]) -> list[Problem]:
    """Warnings for an image listed twice in one split, or in more than one split (a leak into val/test)."""
    splits_of: dict[Path, list[str]] = defaultdict(list)
    shown_path: dict[Path, Path] = {}
    for split, data in loaded.items():
        for record in data.records:
            splits_of[record.path.resolve()].append(split)
            shown_path.setdefault(record.path.resolve(), record.path)
    problems = []
    for resolved, splits in splits_of.items():
        path = shown_path[resolved]
        counts = Counter(splits)
        for split, n in counts.items():
            if n > 1:
                problems.append(Problem(path, f"listed {n} times in the {split} split"))
        if len(counts) > 1:
            problems.append(Problem(path, f"in more than one split: {', '.join(counts)}"))
    return problems


def check_dataset(exp: Experiment, splits: tuple[str, ...] = SPLITS) -> DatasetReport:
    """Read each split of the experiment's dataset and report it; never raises for a bad dataset.

    A split whose list or JSON file is missing or unreadable is an error in the
    report, not an exception. Also reports images shared between splits,
    images stored rotated, and (coverage_problems) an empty or all-background
    split and a class with no box in a split.
    """
    loaded: dict[str, DatasetSplit] = {}
    stats, problems = [], []
    for split in splits:
        source = split_source(exp, split)
        try:
            data = load_split(exp, split)
        except (OSError, ValueError) as exc:
            problems.append(Problem(source, f"{split} split not read: {str(exc).removeprefix(f'{source}: ')}", "error"))
            continue
        loaded[split] = data
        problems.extend(data.problems)
        stats.append(_split_stats(split, source, data))
        problems.extend(coverage_problems(split, source, data))
        problems.extend(rotated_problems(split, data))
    problems.extend(_repeated_images(loaded))
    # two splits may read the same file (val: trainval, test: trainval): report each problem once
    unique = sorted(dict.fromkeys(problems), key=lambda p: p.severity != "error")
    return DatasetReport(exp.dataset.name, exp.dataset.format, exp.dataset.root, exp.classes, tuple(stats), tuple(unique))


def _show_path(path: Path, root: Path) -> str:
    """The path relative to the dataset root when it is inside it, escaped for rich markup."""
    return escape(str(path.relative_to(root)) if path.is_relative_to(root) else str(path))


def _show_sizes(sizes: tuple[tuple[int, int, int], ...]) -> str:
    shown = ", ".join(f"{w}x{h} ({n})" for w, h, n in sizes[:MAX_SIZES_SHOWN])
    if len(sizes) <= MAX_SIZES_SHOWN:
        return shown or "-"
    widths, heights = [s[0] for s in sizes], [s[1] for s in sizes]
    return (
        f"{shown} and {len(sizes) - MAX_SIZES_SHOWN} more; "
        f"widths {min(widths)}-{max(widths)}, heights {min(heights)}-{max(heights)}"
    )


def report_console() -> Console:
    """Standard output: the terminal's width on a terminal, else wide enough that no table is cut."""
    console = Console()
    return console if console.is_terminal else Console(width=UNCUT_WIDTH)


def print_report(report: DatasetReport, console: Console) -> None:
    """Print the report as tables: images and boxes per split and class, sizes, then every problem."""
    console.print(f"[bold]{escape(report.dataset)}[/bold] ({report.format}, {escape(str(report.root))})")
    counts = Table(title="Images and boxes per split")
    for column in ("split", "file", "images", "background", *map(escape, report.class_names), "boxes", "difficult"):
        counts.add_column(column, justify="left" if column in ("split", "file") else "right")
    for s in report.splits:
        counts.add_row(
            s.split, _show_path(s.source, report.root), str(s.num_images), str(s.num_background),
            *(str(n) for n in s.boxes_per_class), str(s.num_boxes), str(s.num_difficult),
        )
    console.print(counts)

    sizes = Table(title="Image and box sizes (pixels, width x height)")
    for column in ("split", "image sizes (images)", "box min", "box median", "box max"):
        sizes.add_column(column)
    for s in report.splits:
        b = s.box_sizes
        box_wh = (f"{w:g}x{h:g}" for w, h in (b.min_wh_px, b.median_wh_px, b.max_wh_px))
        sizes.add_row(s.split, _show_sizes(s.image_sizes), *box_wh)
    console.print(sizes)

    if report.problems:
        problems = Table(title="Problems")
        for column in ("severity", "file", "problem"):
            problems.add_column(column, overflow="fold")
        for p in report.problems:
            style = "red" if p.severity == "error" else "yellow"
            problems.add_row(f"[{style}]{p.severity}[/{style}]", _show_path(p.file, report.root), escape(p.message))
        console.print(problems)
    num_background = sum(s.num_background for s in report.splits)
    if num_background:
        per_split = ", ".join(f"{s.split} {s.num_background}" for s in report.splits if s.num_background)
        console.print(f"{num_background} background image(s) without annotation ({per_split}): trained as images with no objects")
    verdict = "[red]errors[/red]" if report.num_errors else "[green]ok[/green]"
    console.print(f"{verdict}: {report.num_errors} error(s), {report.num_warnings} warning(s)")
