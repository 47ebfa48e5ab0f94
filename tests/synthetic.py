"""Small synthetic detection datasets for tests: coloured shapes on noise, in VOC or COCO layout.

Every class is one shape in one solid colour, 21-41 px, never overlapping,
so a nano model can learn them in a few epochs. The returned
`SyntheticDataset` says what a correct reader must find (`images`: the boxes
after clipping and dropping) and where each injected flaw should be reported
(`flaw_files`), so tests compare against it instead of repeating numbers.

    ds = make_voc(tmp_path, n_images=10, extras=("zero_area_box",))
    exp_yaml = write_experiment(tmp_path / "exp.yaml", ds.root, "voc", ds.classes)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import cv2
import numpy as np
import yaml

SPLITS = ("train", "val", "test")
FLAWS = (
    "malformed_xml",  # VOC only: a truncated XML file -> error, image skipped
    "unknown_class",  # an extra box of class "hexagon" -> error (with its count), box dropped
    "zero_area_box",  # an extra box of zero width, as in BCCD -> warning, box dropped
    "outside_box",  # a shape crossing the right edge -> warning, box clipped
    "missing_image",  # listed / in the JSON, no file -> error, image skipped
    "unreadable_image",  # a .jpg holding text -> error, image skipped
    "size_mismatch",  # annotation says the image is 16 px wider -> warning
    "uppercase_png",  # image saved as .PNG -> read like any other
    "crowd",  # one box difficult (VOC) / iscrowd (COCO) -> kept as difficult
    "repeated_across_splits",  # one image in train and val -> warning from the dataset check
)
UNKNOWN_CLASS = "hexagon"
# BGR, saturated, far from the dark grey noise and from each other
PALETTE_BGR = ((0, 0, 255), (0, 255, 0), (255, 0, 0), (0, 255, 255), (255, 0, 255), (255, 255, 0))
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True, slots=True)
class SyntheticObject:
    """One drawn shape; xyxy in image pixels, x2 and y2 exclusive (as the reader's boxes)."""

    class_name: str
    xyxy: tuple[int, int, int, int]
    difficult: bool = False


@dataclass(frozen=True, slots=True)
class SyntheticImage:
    """An image a correct reader loads: its splits and the boxes it must find (after clipping and dropping)."""

    file_name: str
    splits: tuple[str, ...]
    objects: tuple[SyntheticObject, ...]
    background: bool = False


@dataclass(frozen=True, slots=True)
class SyntheticDataset:
    """What make_voc / make_coco wrote.

    images: by file name, only those a reader should load (not the missing,
        unreadable or malformed ones).
    flaw_files: each injected flaw -> the file its Problem names.
    """

    root: Path
    format: str
    classes: tuple[str, ...]
    image_wh: tuple[int, int]
    images: dict[str, SyntheticImage]
    flaw_files: dict[str, Path] = field(default_factory=dict)

    def split_file(self, split: str) -> Path:
        """The VOC list file or COCO JSON file of a split (train, val or test)."""
        if self.format == "voc":
            return self.root / "ImageSets" / "Main" / f"{split}.txt"
        return self.root / f"{split}.json"

    def in_split(self, split: str) -> list[SyntheticImage]:
        return [image for image in self.images.values() if split in image.splits]


@dataclass(frozen=True, slots=True)
class _Planned:
    """An image to write, format-independent: drawn pixels and what its annotation says."""

    stem: str
    suffix: str
    splits: tuple[str, ...]
    pixels: np.ndarray | None  # uint8 [H, W, 3] BGR; None: write no file (missing) or junk (unreadable)
    annotated: tuple[SyntheticObject, ...]  # written to the annotation file, flaws included
    expected: tuple[SyntheticObject, ...]  # what a reader keeps
    background: bool = False
    annotation_wh: tuple[int, int] | None = None  # the size the annotation claims
    flaw: str | None = None

    @property
    def file_name(self) -> str:
        return self.stem + self.suffix


def _draw(pixels: np.ndarray, shape: str, xyxy: tuple[int, int, int, int], colour_bgr: tuple[int, int, int]) -> None:
    """Draw a filled shape exactly covering pixels [x1, x2) x [y1, y2)."""
    x1, y1, x2, y2 = xyxy
    if shape == "circle":
        radius = (x2 - x1 - 1) // 2
        cv2.circle(pixels, (x1 + radius, y1 + radius), radius, colour_bgr, -1)
    elif shape == "square":
        cv2.rectangle(pixels, (x1, y1), (x2 - 1, y2 - 1), colour_bgr, -1)
    else:
        points = np.array([[x1, y2 - 1], [x2 - 1, y2 - 1], [(x1 + x2 - 1) // 2, y1]], dtype=np.int32)
        cv2.fillPoly(pixels, [points], colour_bgr)


def _shape_of(classes: tuple[str, ...], class_name: str) -> str:
    return class_name if class_name in SHAPES else SHAPES[classes.index(class_name) % len(SHAPES)]


def _place(
    rng: np.random.Generator, image_wh: tuple[int, int], placed: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int] | None:
    """A free square box 21-41 px inside the image (2 px from any other), or None after 100 tries."""
    width, height = image_wh
    for _ in range(100):
        size = 2 * int(rng.integers(10, 21)) + 1
        x1, y1 = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        box = (x1, y1, x1 + size, y1 + size)
        if all(box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2 for b in placed):
            return box
    return None


def _noise(rng: np.random.Generator, image_wh: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 90, (image_wh[1], image_wh[0], 3), dtype=np.uint8)


def _shapes_image(rng, classes, image_wh, n_objects: int, first_class: int) -> tuple[np.ndarray, list[SyntheticObject]]:
    """Noise with n_objects shapes; classes cycle from first_class so every class turns up in every split."""
    pixels, objects = _noise(rng, image_wh), []
    for j in range(n_objects):
        box = _place(rng, image_wh, [o.xyxy for o in objects])
        if box is None:
            break
        class_index = (first_class + j) % len(classes)
        _draw(pixels, _shape_of(classes, classes[class_index]), box, PALETTE_BGR[class_index % len(PALETTE_BGR)])
        objects.append(SyntheticObject(classes[class_index], box))
    return pixels, objects


def _flawed(rng, classes, image_wh, flaw: str) -> _Planned:
    """One image carrying one flaw, in the train split."""
    width, height = image_wh
    # one class-0 shape in the left part, leaving the right 42 px for the flaw's own shape
    pixels, box = _noise(rng, image_wh), _place(rng, (width - 42, height), [])
    _draw(pixels, _shape_of(classes, classes[0]), box, PALETTE_BGR[0])
    objects = [SyntheticObject(classes[0], box)]
    annotated, expected = list(objects), list(objects)
    splits, suffix, annotation_wh = ("train",), ".jpg", image_wh
    if flaw == "unknown_class":
        other = _place(rng, image_wh, [box])
        _draw(pixels, "triangle", other, (200, 200, 200))
        annotated.append(SyntheticObject(UNKNOWN_CLASS, other))
    elif flaw == "zero_area_box":
        x1, y1 = box[:2]
        annotated.append(SyntheticObject(classes[0], (x1, y1, x1, y1 + 10)))
    elif flaw == "outside_box":
        edge_box, clipped = (width - 15, 10, width + 15, 40), (width - 15, 10, width, 40)
        _draw(pixels, "square", clipped, PALETTE_BGR[(len(classes) - 1) % len(PALETTE_BGR)])
        annotated.append(SyntheticObject(classes[-1], edge_box))
        expected.append(SyntheticObject(classes[-1], clipped))
    elif flaw in ("missing_image", "unreadable_image", "malformed_xml"):
        expected = []
        if flaw != "malformed_xml":
            pixels = None
    elif flaw == "size_mismatch":
        annotation_wh = (width + 16, height)
    elif flaw == "uppercase_png":
        suffix = ".PNG"
    elif flaw == "crowd":
        annotated = expected = [SyntheticObject(o.class_name, o.xyxy, difficult=True) for o in objects]
    elif flaw == "repeated_across_splits":
        splits = ("train", "val")
    else:
        raise ValueError(f"unknown flaw {flaw!r}; expected one of {', '.join(FLAWS)}")
    return _Planned(f"flaw_{flaw}", suffix, splits, pixels, tuple(annotated), tuple(expected), False, annotation_wh, flaw)


def _plan(n_images: int, classes: tuple[str, ...], image_wh, background: int, extras, seed: int) -> list[_Planned]:
    """Clean images (60/20/20 over train/val/test), background images (round robin), then one image per flaw."""
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(n_images):
        pixels, objects = _shapes_image(rng, classes, image_wh, 1 + i % 3, i)
        split = ("train", "train", "train", "val", "test")[i % 5]
        plan.append(_Planned(f"img_{i:03d}", ".jpg", (split,), pixels, tuple(objects), tuple(objects), annotation_wh=image_wh))
    for k in range(background):
        plan.append(_Planned(f"background_{k:02d}", ".jpg", (SPLITS[k % 3],), _noise(rng, image_wh), (), (), True))
    plan.extend(_flawed(rng, classes, image_wh, flaw) for flaw in extras)
    return plan


def _write_image(folder: Path, planned: _Planned) -> None:
    path = folder / planned.file_name
    if planned.pixels is not None:
        cv2.imwrite(str(path), planned.pixels)
    elif planned.flaw == "unreadable_image":
        path.write_text("not an image\n")


def _loaded_images(plan: list[_Planned]) -> dict[str, SyntheticImage]:
    return {
        p.file_name: SyntheticImage(p.file_name, p.splits, p.expected, p.background)
        for p in plan
        if p.flaw not in ("missing_image", "unreadable_image", "malformed_xml")
    }


def _voc_xml(planned: _Planned) -> str:
    width, height = planned.annotation_wh
    objects = "".join(
        f"  <object>\n    <name>{escape(o.class_name)}</name>\n    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n"
        f"    <difficult>{int(o.difficult)}</difficult>\n    <bndbox>\n"
        f"      <xmin>{o.xyxy[0]}</xmin>\n      <ymin>{o.xyxy[1]}</ymin>\n"
        f"      <xmax>{o.xyxy[2]}</xmax>\n      <ymax>{o.xyxy[3]}</ymax>\n    </bndbox>\n  </object>\n"
        for o in planned.annotated
    )
    return (
        f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{planned.file_name}</filename>\n"
        f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
        f"  <segmented>0</segmented>\n{objects}</annotation>\n"
    )


def make_voc(
    root: Path,
    n_images: int = 20,
    classes: tuple[str, ...] = ("circle", "square"),
    image_wh: tuple[int, int] = (128, 96),
    background: int = 2,
    extras: tuple[str, ...] = (),
    seed: int = 0,
) -> SyntheticDataset:
    """Write a Pascal VOC dataset under root: JPEGImages/, Annotations/, ImageSets/Main/{train,val,test}.txt.

    n_images annotated images (1-3 shapes each), `background` listed images
    with no XML, and one extra train image per flaw named in `extras` (see FLAWS).
    """
    root = Path(root)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    plan = _plan(n_images, tuple(classes), image_wh, background, extras, seed)
    flaw_files = {}
    for planned in plan:
        _write_image(root / "JPEGImages", planned)
        xml_path = root / "Annotations" / f"{planned.stem}.xml"
        if not planned.background:
            xml = _voc_xml(planned)
            xml_path.write_text(xml[: len(xml) // 2] if planned.flaw == "malformed_xml" else xml)
        if planned.flaw is not None:
            flaw_files[planned.flaw] = {
                "missing_image": root / "ImageSets" / "Main" / "train.txt",
                "unreadable_image": root / "JPEGImages" / planned.file_name,
                "uppercase_png": root / "JPEGImages" / planned.file_name,
                "repeated_across_splits": root / "JPEGImages" / planned.file_name,
            }.get(planned.flaw, xml_path)
    for split in SPLITS:
        ids = [p.stem for p in plan if split in p.splits]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return SyntheticDataset(root, "voc", tuple(classes), tuple(image_wh), _loaded_images(plan), flaw_files)


def make_coco(
    root: Path,
    n_images: int = 20,
    classes: tuple[str, ...] = ("circle", "square"),
    image_wh: tuple[int, int] = (128, 96),
    background: int = 2,
    extras: tuple[str, ...] = (),
    seed: int = 0,
    category_ids: dict[str, int] | None = None,
) -> SyntheticDataset:
    """Write a COCO dataset: images in root, root/{train,val,test}.json with file names relative to root.

    Category ids default to sparse and in reverse class order (last class id 1,
    then 3, 5, ...), so a reader that maps by id instead of by name fails.
    The unknown_class flaw adds a category "hexagon" to train.json.
    """
    if "malformed_xml" in extras:
        raise ValueError("malformed_xml is a VOC flaw; write a broken JSON file in the test instead")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    classes = tuple(classes)
    category_ids = category_ids or {name: 2 * (len(classes) - 1 - i) + 1 for i, name in enumerate(classes)}
    plan = _plan(n_images, classes, image_wh, background, extras, seed)
    flaw_files = {}
    for planned in plan:
        _write_image(root, planned)
        if planned.flaw is not None:
            image_flaw = planned.flaw in ("unreadable_image", "uppercase_png", "repeated_across_splits")
            flaw_files[planned.flaw] = root / (planned.file_name if image_flaw else "train.json")
    for split in SPLITS:
        names = dict(category_ids)
        images, annotations = [], []
        for image_id, planned in enumerate(plan, start=1):
            if split not in planned.splits:
                continue
            width, height = planned.annotation_wh or image_wh
            images.append({"id": image_id, "file_name": planned.file_name, "width": width, "height": height})
            for o in planned.annotated:
                names.setdefault(o.class_name, 99)
                x1, y1, x2, y2 = o.xyxy
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": names[o.class_name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(o.difficult),
                })
        categories = sorted(({"id": i, "name": n, "supercategory": "shape"} for n, i in names.items()), key=lambda c: c["id"])
        document = {"images": images, "annotations": annotations, "categories": categories}
        (root / f"{split}.json").write_text(json.dumps(document, indent=1))
    return SyntheticDataset(root, "coco", classes, tuple(image_wh), _loaded_images(plan), flaw_files)


def _merge(base: dict, overrides: dict) -> dict:
    """base with overrides applied; nested dicts merge key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def write_experiment(path: Path, root: Path, format: str, classes: tuple[str, ...], **overrides) -> Path:
    """Write a tiny experiment YAML (nano, 96x96, 2 epochs, batch 4, no workers) and return its path.

    overrides replace top-level keys or merge into sections:
    `write_experiment(p, ds.root, "voc", ds.classes, train={"epochs": 3}, model={"input_hw": [64, 64]})`.
    output_dir is path's folder / "runs".
    """
    path = Path(path)
    suffix = ".json" if format == "coco" else ""
    experiment = {
        "name": "synthetic",
        "classes": list(classes),
        "dataset": {
            "name": f"synthetic-{format}", "format": format, "root": str(root),
            "train": f"train{suffix}", "val": f"val{suffix}", "test": f"test{suffix}",
        },
        "model": {"architecture": "yolox_nano", "input_hw": [96, 96]},
        "train": {
            "epochs": 2, "batch_size": 4, "workers": 0, "warmup_epochs": 1, "no_aug_epochs": 1, "eval_interval": 1,
        },
        "output_dir": str(path.parent / "runs"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_merge(experiment, overrides), sort_keys=False))
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to the first `keep` of its bytes, as an interrupted copy leaves it; return the path.

    A JPEG cut this way still opens and passes PIL's verify(); OpenCV decodes its missing part as grey.
    """
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def assert_sound(split, root: Path) -> None:
    """What any loaded split must hold, however bad its files: each problem names a file under root,
    each box is finite, inside its image and of positive area, each class id is a class.

    split: a trainer.datasets.records.DatasetSplit.
    """
    root = Path(root).resolve()
    for problem in split.problems:
        assert problem.severity in ("error", "warning") and problem.message
        assert Path(problem.file).resolve().is_relative_to(root), problem
    for record in split.records:
        assert Path(record.path).resolve().is_relative_to(root), record.path
        xyxy = record.xyxy
        assert np.isfinite(xyxy).all(), record
        assert (xyxy[:, [0, 1]] >= 0).all() and (xyxy[:, 2] <= record.width).all() and (xyxy[:, 3] <= record.height).all()
        assert (xyxy[:, 2] > xyxy[:, 0]).all() and (xyxy[:, 3] > xyxy[:, 1]).all()
        assert ((record.class_id >= 0) & (record.class_id < len(split.class_names))).all()


def bccd_subset(bccd_root: Path, dest: Path, counts: dict[str, int]) -> Path:
    """A VOC dataset at dest holding the first counts[split] images of each of BCCD's splits; return dest.

    The images and XML files are copied (a test may change them); the splits named in counts are written.
    """
    dest = Path(dest)
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dest / folder).mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        ids = (Path(bccd_root) / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:count]
        for image_id in ids:
            shutil.copyfile(Path(bccd_root) / "JPEGImages" / f"{image_id}.jpg", dest / "JPEGImages" / f"{image_id}.jpg")
            shutil.copyfile(Path(bccd_root) / "Annotations" / f"{image_id}.xml", dest / "Annotations" / f"{image_id}.xml")
        (dest / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return dest
