"""COCO detection JSON (`images`, `annotations`, `categories`) read into the trainer's records.

Categories are matched to the experiment's classes by name, so label order
comes from the experiment, never from COCO's category ids (which are often
sparse, 1-based, or in another order). Problems are reported against the JSON
file, with the image named in the message, since that is the file to fix.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

from streamd.yamlconfig import read_utf8
from trainer.datasets.images import image_info
from trainer.datasets.records import DatasetSplit, Problem, leaves_root, record_from_objects, unknown_label_problem


def _read_json(ann_file: Path) -> dict:
    """The JSON object of the annotation file; FileNotFoundError or ValueError naming the file."""
    if ann_file.exists() and not ann_file.is_file():
        raise ValueError(f"{ann_file}: the COCO annotation file is not a regular file (a folder or a device)")
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file}: COCO annotation file not found")
    text = read_utf8(ann_file)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ann_file}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; arrays nested thousands deep
        raise ValueError(f"{ann_file}: unreadable JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError(f"{ann_file}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(document.get(key), list):
            raise ValueError(f"{ann_file}: {key!r} is missing or not a list")
    return document


def _is_int(value: object) -> bool:
    """An integer, not a boolean (which Python counts as one: `true` would be id 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: object) -> bool:
    """A COCO image id: an integer or a string."""
    return _is_int(value) or isinstance(value, str)


def _category_classes(
    categories: list, class_names: tuple[str, ...], ann_file: Path
) -> tuple[dict[int, int | None], dict[int, str], list[Problem]]:
    """COCO category id -> class index (None for a category the experiment does not train), and id -> name.

    Raises ValueError for a category id listed twice: every annotation of it would be ambiguous.
    """
    class_of, name_of, problems = {}, {}, []
    for category in categories:
        if not isinstance(category, dict) or not _is_int(category.get("id")) or "name" not in category:
            problems.append(Problem(ann_file, f"category {category!r} needs an integer id and a name; ignored", "error"))
            continue
        name = str(category["name"]).strip()
        if category["id"] in name_of:
            raise ValueError(
                f"{ann_file}: category id {category['id']} is listed twice ({name_of[category['id']]!r} and {name!r}); "
                "its annotations cannot be told apart"
            )
        class_of[category["id"]] = class_names.index(name) if name in class_names else None
        name_of[category["id"]] = name
    known = ", ".join(sorted(set(name_of.values())))
    problems.extend(
        Problem(ann_file, f"class {name!r} has no COCO category (categories: {known})")
        for name in class_names
        if name not in name_of.values()
    )
    return class_of, name_of, problems


def _parse_bbox(bbox) -> list[float] | None:
    """COCO [x, y, width, height] to [x1, y1, x2, y2] (maybe not finite), or None when it is not four numbers."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_int(v) or isinstance(v, float) for v in bbox):
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except OverflowError:  # an integer beyond the float range
        return [math.inf] * 4
    return [x, y, x + w, y + h]


def load_coco(
    image_root: Path, ann_file: Path, class_names: tuple[str, ...], dataset: str = "coco", split: str | None = None,
    ignore_labels: tuple[str, ...] = (),
) -> DatasetSplit:
    """Read one split from a COCO JSON file; image `file_name`s are relative to `image_root`.

    split names the result (default: the JSON file's stem, as VOC names a split by its list file).

    Raises FileNotFoundError or ValueError, naming the file, when the JSON is
    missing, not JSON, or lacks the three lists. Anything wrong inside it becomes
    a Problem: an unreadable or missing image, or a file_name that leaves
    `image_root`, is skipped (error); the annotations of a category that is
    neither in `class_names` nor in `ignore_labels` are dropped (one error per
    category, with its count); an annotation with a bad bbox is dropped
    (warning; error when the bbox is not finite); an annotation id used twice
    keeps its first annotation (error), and an annotation repeating another's
    image, category and bbox is dropped (warning). Boxes are clipped to the
    displayed image (EXIF orientation applied, warning). An image with no
    annotation is a background image. `iscrowd: 1` boxes are kept as difficult.
    A boolean is never taken for a number (`true` would be id 1).
    """
    image_root, ann_file = Path(image_root), Path(ann_file)
    document = _read_json(ann_file)
    class_of, name_of, problems = _category_classes(document["categories"], tuple(class_names), ann_file)

    annotations_of: dict[int | str, list[tuple[str, int, list[float], bool]]] = defaultdict(list)
    annotated_ids: set[int | str] = set()  # any annotation at all, kept or dropped: such an image is not background
    dropped_by_category: Counter[int] = Counter()
    images_by_category: defaultdict[int, set] = defaultdict(set)
    first_of_id: dict = {}  # annotation id -> the image id of the first annotation with it
    first_of_box: dict[tuple, object] = {}  # (image id, category id, bbox) -> the id of its first annotation
    file_name_of = {  # for messages about an annotation
        image["id"]: image.get("file_name") for image in document["images"] if isinstance(image, dict) and _is_id(image.get("id"))
    }
    for annotation in document["annotations"]:
        if not isinstance(annotation, dict) or not _is_id(annotation.get("image_id")):
            problems.append(Problem(ann_file, f"annotation {annotation!r} needs an image_id; dropped"))
            continue
        ann_id, category_id = annotation.get("id"), annotation.get("category_id")
        annotated_ids.add(annotation["image_id"])
        if _is_id(ann_id) and ann_id in first_of_id:
            images = f"image ids {first_of_id[ann_id]!r} and {annotation['image_id']!r}"
            message = f"annotation id {ann_id!r} is used twice ({images}); the second dropped"
            problems.append(Problem(ann_file, message, "error"))
            continue
        if _is_id(ann_id):
            first_of_id[ann_id] = annotation["image_id"]
        same = (annotation["image_id"], repr(category_id), repr(annotation.get("bbox")))
        if same in first_of_box:
            message = f"annotation {ann_id!r} repeats annotation {first_of_box[same]!r} (same image, category and bbox); dropped"
            problems.append(Problem(ann_file, message))
            continue
        first_of_box[same] = ann_id
        if not _is_int(category_id) or category_id not in class_of:
            message = f"annotation {ann_id}: category_id {category_id!r} is not in categories; dropped"
            problems.append(Problem(ann_file, message))
            continue
        if class_of[category_id] is None:
            if name_of[category_id] not in ignore_labels:
                dropped_by_category[category_id] += 1
                images_by_category[category_id].add(annotation["image_id"])
            continue
        xyxy = _parse_bbox(annotation.get("bbox"))
        if xyxy is None:
            message = f"annotation {ann_id}: bbox {annotation.get('bbox')!r} is not [x, y, w, h]; dropped"
            problems.append(Problem(ann_file, message))
            continue
        if not all(map(math.isfinite, xyxy)):  # clipping would turn inf into a full-width box
            image_id = annotation["image_id"]
            where = f"annotation {ann_id} of image {file_name_of.get(image_id)!r} (id {image_id!r})"
            problems.append(Problem(ann_file, f"{where}: bbox {annotation['bbox']!r} is not finite; dropped", "error"))
            continue
        difficult = annotation.get("iscrowd", 0) == 1
        annotations_of[annotation["image_id"]].append((name_of[category_id], class_of[category_id], xyxy, difficult))
    problems.extend(
        unknown_label_problem(name_of[category_id], count, len(images_by_category[category_id]), tuple(class_names), ann_file)
        for category_id, count in sorted(dropped_by_category.items())
    )

    records, seen_ids = [], set()
    for image in document["images"]:
        valid = isinstance(image, dict) and _is_id(image.get("id")) and isinstance(image.get("file_name"), str)
        if not valid:
            problems.append(Problem(ann_file, f"image entry {image!r} needs an id and a file_name; skipped", "error"))
            continue
        image_id, file_name = image["id"], image["file_name"]
        where = f"image {file_name!r} (id {image_id})"
        if image_id in seen_ids:
            problems.append(Problem(ann_file, f"{where}: image id {image_id} repeated; skipped", "error"))
            continue
        seen_ids.add(image_id)
        if leaves_root(file_name):
            problems.append(Problem(ann_file, f"{where}: file_name points outside {image_root}; skipped", "error"))
            continue
        image_path = image_root / file_name
        if not image_path.is_file():
            problems.append(Problem(ann_file, f"{where} not found under {image_root}; skipped", "error"))
            continue
        try:
            info = image_info(image_path)
        except OSError as exc:
            problems.append(Problem(image_path, f"{exc}; skipped", "error"))
            continue
        width, height = info.width, info.height
        json_wh = (image.get("width"), image.get("height"))
        if json_wh != (None, None) and json_wh != (width, height):
            message = f"{where}: width x height {json_wh[0]}x{json_wh[1]} differs from the file's {width}x{height}"
            problems.append(Problem(ann_file, f"{message}; using the file's"))
        objects = annotations_of.pop(image_id, [])
        record, box_problems = record_from_objects(
            str(image_id), image_path, width, height, objects, ann_file, background=image_id not in annotated_ids,
            orientation=info.orientation,
        )
        problems.extend(replace(p, message=f"{where}: {p.message}") for p in box_problems)
        records.append(record)
    problems.extend(
        Problem(ann_file, f"{len(objects)} annotation(s) of image id {image_id!r}, which is not in images; dropped")
        for image_id, objects in annotations_of.items()
        if image_id not in seen_ids
    )
    listed = len(document["images"])
    return DatasetSplit(dataset, split or ann_file.stem, tuple(class_names), tuple(records), tuple(problems), listed)
