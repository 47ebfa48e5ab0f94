"""Pascal VOC as the BCCD seed uses it: Annotations/, JPEGImages/, ImageSets/Main/<split>.txt."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from defusedxml import ElementTree
from PIL import Image, UnidentifiedImageError

from streamd.yamlconfig import read_utf8
from trainer.datasets.records import DatasetSplit, ImageRecord, Problem, leaves_root, record_from_objects

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


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image that decodes in full; raises OSError for an unreadable, truncated or corrupt file.

    Reading the header (or PIL's verify()) is not enough: a truncated JPEG
    passes both, and OpenCV later decodes it with its missing half grey.
    """
    try:
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (size[0] // 8, size[1] // 8))  # JPEG at 1/8 scale: every byte read, less work
            image.load()
            return size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise OSError(f"unreadable image: {exc}") from exc


def _parse_xml(xml_path: Path, class_names: tuple[str, ...]) -> tuple[list, list[Problem], tuple[int, int] | None]:
    """Objects [(label, class index or None, xyxy, difficult)] and the <size> of one XML file."""
    root = ElementTree.parse(xml_path).getroot()
    size = root.find("size")
    wh, objects, problems = None, [], []
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
            problems.append(Problem(xml_path, f"unknown class {name!r} (known: {', '.join(class_names)}), box dropped"))
            continue
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((name, class_names.index(name), xyxy, difficult))
    return objects, problems, wh


def load_voc(root: Path, split: str, class_names: tuple[str, ...], dataset: str = "voc") -> DatasetSplit:
    """Read one split. Never raises for a bad file: it becomes a Problem and the image is skipped.

    A listed image with no XML file is a background image: one log line gives
    their count, and an XML file whose name differs only in case (`.XML`) is a
    warning, since that image is read as background too. A listed id that
    leaves the dataset root (absolute, or with '..') is an error and skipped.
    Raises FileNotFoundError or ValueError, naming the file, for a missing or
    non-UTF-8 split list.
    """
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: split list not found (dataset root {root})")
    ids = [line.split()[0] for line in read_utf8(list_file).splitlines() if line.strip()]
    annotations = root / "Annotations"
    xml_by_lower_name = {p.name.lower(): p for p in annotations.iterdir()} if annotations.is_dir() else {}
    records, problems = [], []
    for image_id in ids:
        if leaves_root(image_id):
            problems.append(Problem(list_file, f"image id {image_id!r} points outside the dataset root; skipped", "error"))
            continue
        image_path = find_image(root / "JPEGImages", image_id)
        if image_path is None:
            problems.append(Problem(list_file, f"image {image_id!r} listed but not found in JPEGImages/", "error"))
            continue
        try:
            width, height = image_size(image_path)
        except OSError as exc:
            problems.append(Problem(image_path, str(exc), "error"))
            continue
        xml_path = annotations / f"{image_id}.xml"
        if not xml_path.is_file():
            other_case = xml_by_lower_name.get(xml_path.name.lower())
            if other_case is not None:
                message = f"not read: the annotation of image {image_id!r} must be named {xml_path.name!r}; read as background"
                problems.append(Problem(other_case, message))
            records.append(ImageRecord(image_id, image_path, width, height, np.zeros((0, 4)), [], [], background=True))
            continue
        try:
            objects, xml_problems, xml_wh = _parse_xml(xml_path, class_names)
        except (ElementTree.ParseError, ValueError) as exc:
            problems.append(Problem(xml_path, f"malformed XML: {exc}; image skipped", "error"))
            continue
        problems.extend(xml_problems)
        if xml_wh is not None and xml_wh != (width, height):
            problems.append(Problem(xml_path, f"<size> {xml_wh[0]}x{xml_wh[1]} differs from the image's {width}x{height}; using the image's"))
        record, box_problems = record_from_objects(image_id, image_path, width, height, objects, xml_path)
        problems.extend(box_problems)
        records.append(record)
    result = DatasetSplit(dataset, split, tuple(class_names), tuple(records), tuple(problems))
    if result.num_background:
        log.warning(
            "%s: %d of %d images have no file in Annotations/ and are read as background (no objects)",
            list_file, result.num_background, len(result),
        )
    return result
