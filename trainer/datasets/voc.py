"""Pascal VOC as the BCCD seed uses it: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
from defusedxml import ElementTree

from streamd.yamlconfig import read_utf8
from trainer.datasets.images import image_info
from trainer.datasets.records import (
    DatasetSplit, ImageRecord, Problem, leaves_root, record_from_objects, unknown_label_problem,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_image(folder: Path, image_id: str) -> Path | None:
    """The image file for an id, whatever the case of its suffix."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (suffix, suffix.upper()):
            path = folder / f"{image_id}{candidate}"
            if path.is_file():
                return path
    return None


def _parse_xml(
    xml_path: Path, class_names: tuple[str, ...], ignore_labels: tuple[str, ...]
) -> tuple[list, list[Problem], tuple[int, int] | None, list[str]]:
    """Objects [(label, class index, xyxy, difficult)], problems, the <size> and the labels that are not classes.

    A label in ignore_labels is dropped without a word; any other label that is not a class is returned.
    """
    root = ElementTree.parse(xml_path).getroot()
    size = root.find("size")
    wh, objects, problems, unknown = None, [], [], []
    if size is not None and size.findtext("width") and size.findtext("height"):
        try:
            wh = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
        except (ValueError, OverflowError):  # "nan", "inf"
            # the image header gives the size anyway: a bad <size> is no reason to lose the boxes
            problems.append(Problem(xml_path, f"non-numeric <size> {size.findtext('width')!r} x {size.findtext('height')!r} ignored"))
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        if box is None:
            problems.append(Problem(xml_path, f"object {name!r} has no <bndbox>, dropped"))
            continue
        try:
            xyxy = [float(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            problems.append(Problem(xml_path, f"object {name!r} has a non-numeric <bndbox>, dropped"))
            continue
        if not all(map(math.isfinite, xyxy)):  # clipping would turn inf into a full-width box
            problems.append(Problem(xml_path, f"object {name!r} has a non-finite <bndbox> {xyxy}, dropped", "error"))
            continue
        if name not in class_names:
            if name not in ignore_labels:
                unknown.append(name)
            continue
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, class_names.index(name), xyxy, difficult))
    return objects, problems, wh, unknown


def load_voc(
    root: Path, split: str, class_names: tuple[str, ...], dataset: str = "voc", ignore_labels: tuple[str, ...] = ()
) -> DatasetSplit:
    """Read one split. Never raises for a bad file: it becomes a Problem and the image is skipped.

    Sizes and boxes are those of the displayed image (EXIF orientation
    applied, trainer.datasets.images). A label that is neither a class nor in
    ignore_labels is one error per label with its box count (its boxes are
    dropped), naming the first XML file that has it. An annotation path that
    is not a regular file (a folder, a device) is an error and its image skipped.

    A listed image with no XML file is a background image: one log line gives
    their count, and an XML file whose name differs only in case (`.XML`) is a
    warning, since that image is read as background too. A listed id that
    leaves the dataset root (absolute, or with '..') is an error and skipped.
    Raises FileNotFoundError or ValueError, naming the file, for a missing or
    non-UTF-8 split list, or one that is a folder or a device.
    """
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if list_file.exists() and not list_file.is_file():
        raise ValueError(f"{list_file}: the split list is not a regular file (a folder or a device)")
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: split list not found (dataset root {root})")
    ids = [line.split()[0] for line in read_utf8(list_file).splitlines() if line.strip()]
    annotations = root / "Annotations"
    xml_by_lower_name = {p.name.lower(): p for p in annotations.iterdir()} if annotations.is_dir() else {}
    records, problems = [], []
    unknown_boxes: Counter[str] = Counter()
    unknown_files: Counter[str] = Counter()
    first_file: dict[str, Path] = {}
    for image_id in ids:
        if leaves_root(image_id):
            problems.append(Problem(list_file, f"image id {image_id!r} points outside the dataset root; skipped", "error"))
            continue
        image_path = find_image(root / "JPEGImages", image_id)
        if image_path is None:
            problems.append(Problem(list_file, f"image {image_id!r} listed but not found in JPEGImages/", "error"))
            continue
        try:
            info = image_info(image_path)
        except OSError as exc:
            problems.append(Problem(image_path, str(exc), "error"))
            continue
        xml_path = annotations / f"{image_id}.xml"
        if xml_path.exists() and not xml_path.is_file():
            problems.append(Problem(xml_path, "not a regular file (a folder or a device); image skipped", "error"))
            continue
        if not xml_path.is_file():
            other_case = xml_by_lower_name.get(xml_path.name.lower())
            if other_case is not None:
                message = f"not read: the annotation of image {image_id!r} must be named {xml_path.name!r}; read as background"
                problems.append(Problem(other_case, message))
            records.append(ImageRecord(image_id, image_path, info.width, info.height, np.zeros((0, 4)), [], [],
                                       background=True, orientation=info.orientation))
            continue
        try:
            objects, xml_problems, xml_wh, unknown = _parse_xml(xml_path, class_names, ignore_labels)
        except (ElementTree.ParseError, ValueError, OSError) as exc:
            problems.append(Problem(xml_path, f"malformed XML: {exc}; image skipped", "error"))
            continue
        problems.extend(xml_problems)
        unknown_boxes.update(unknown)
        unknown_files.update(set(unknown))
        for label in unknown:
            first_file.setdefault(label, xml_path)
        if xml_wh is not None and xml_wh != (info.width, info.height):
            problems.append(Problem(xml_path, f"<size> {xml_wh[0]}x{xml_wh[1]} differs from the image's "
                                              f"{info.width}x{info.height}; using the image's"))
        record, box_problems = record_from_objects(
            image_id, image_path, info.width, info.height, objects, xml_path, orientation=info.orientation
        )
        problems.extend(box_problems)
        records.append(record)
    problems.extend(
        unknown_label_problem(label, boxes, unknown_files[label], tuple(class_names), first_file[label])
        for label, boxes in unknown_boxes.most_common()
    )
    result = DatasetSplit(dataset, split, tuple(class_names), tuple(records), tuple(problems), num_listed=len(ids))
    if result.num_background:
        log.warning(
            "%s: %d of %d images have no file in Annotations/ and are read as background (no objects)",
            list_file, result.num_background, len(result),
        )
    return result
