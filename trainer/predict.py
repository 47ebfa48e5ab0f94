"""Run a detector on images, folders and video files, through streamd's own stages; write annotated copies.

`predict(detector, paths, out_dir, ...) -> PredictResult`:

- a video (.mp4 .mkv .avi .mov .ts) runs through the daemon's pipeline
  (streamd.pipeline.daemon.run_pipeline: PyAV source, batched inference,
  annotator, recorder, detection log) as a one-stream file config that loses
  no frame; it gives `<name>.mp4`, annotated H.264 at the source's frame rate,
  and `<name>.jsonl`, its detection log: one streamd.detections/2 message per
  frame, exactly as the daemon writes it;
- an image (.jpg .jpeg .png .bmp, any case) goes through the same inference
  and annotate stages and gives an annotated image of the same name and
  format; `images.jsonl` gets its message (`stream` is the image's output
  path, seq 0, pts 0);
- a folder is searched recursively for both (skipping `out_dir` itself when
  it lies inside), and its tree is kept under `out_dir/<folder name>/`.

Images are read with their EXIF orientation applied (trainer.datasets.images),
as the datasets are. A file that cannot be read, or an image that the model's
letterbox cannot take (5000x1 into 416x416 would be 0 pixels tall), is named in
a warning, counted, and skipped; a video that fails part-way keeps the frames before the failure (its
recording is closed properly) and is reported.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
from tqdm import tqdm

from streamd.config import BatchConfig, StreamConfig, StreamdConfig, ThresholdsConfig
from streamd.detector import Detector
from streamd.model.preprocess import letterbox_hw
from streamd.ops.metrics import Metrics
from streamd.pipeline.compose import Switches
from streamd.pipeline.daemon import run_pipeline
from streamd.stages.annotate import AnnotateStage
from streamd.stages.infer import ResultsStage, SubmitStage
from streamd.stages.message import MessageStage
from streamd.types import Batch, Frame
from trainer.datasets.images import read_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".ts"})
IMAGES_LOG = "images.jsonl"
_ONE_SEGMENT_S = 86400  # the longest segment streamd allows: a video is one recording unless it runs past a day


@dataclass(frozen=True, slots=True)
class PredictResult:
    """What `predict` did; `failed` holds one "file: reason" per input that could not be (fully) read."""

    out_dir: str
    logs: tuple[str, ...]  # the detection logs written: images.jsonl and one .jsonl per video
    num_images: int  # images annotated
    num_videos: int  # videos annotated, including ones cut short by a decode error
    num_frames: int  # video frames annotated
    num_detections: int
    failed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Job:
    source: Path
    output: Path  # relative to out_dir


def collect_inputs(paths: list[Path], out_dir: Path) -> list[_Job]:
    """Every input file with its output path (relative to out_dir), in a stable order.

    Files named directly are kept whatever their suffix (predict warns about
    the ones it cannot handle); folders contribute their images and videos.
    Raises FileNotFoundError for a path that does not exist.
    """
    out_dir = out_dir.resolve()
    jobs, used = [], set()
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*")
                if f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES and f.is_file()
                and not f.resolve().is_relative_to(out_dir)
            )
            pairs = [(f, Path(path.resolve().name) / f.relative_to(path)) for f in found]
        else:
            pairs = [(path, Path(path.name))]
        for source, output in pairs:
            if source.suffix.lower() in VIDEO_SUFFIXES:
                output = output.with_suffix(".mp4")
            candidate, n = output, 1
            while candidate in used:  # same name from two places: a.mp4 and a.mkv, or two folders
                candidate = output.with_name(f"{output.stem}_{n}{output.suffix}")
                n += 1
            used.add(candidate)
            jobs.append(_Job(source, candidate))
    return jobs


def predict(
    detector: Detector,
    paths: list[Path],
    out_dir: Path,
    conf_threshold: float,
    iou_threshold: float,
    batch_size: int = 8,
) -> PredictResult:
    """Annotate every image and video under `paths` into `out_dir`, with their detection logs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = collect_inputs(paths, out_dir)
    images = [j for j in jobs if j.source.suffix.lower() in IMAGE_SUFFIXES]
    videos = [j for j in jobs if j.source.suffix.lower() in VIDEO_SUFFIXES]
    failed = [f"{j.source}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}) or video "
              f"({', '.join(sorted(VIDEO_SUFFIXES))})"
              for j in jobs if j.source.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
    for message in failed:
        log.warning("%s; skipped", message)
    logs: list[str] = []
    num_images = num_detections = 0
    if images:
        num_images, num_detections = _predict_images(
            detector, images, out_dir, conf_threshold, iou_threshold, batch_size, failed
        )
        logs.append(str(out_dir / IMAGES_LOG))
    num_videos = num_frames = 0
    for job in tqdm(videos, desc="videos", unit="video", disable=not videos, dynamic_ncols=True):
        frames, found, error = _predict_video(detector, job, out_dir, conf_threshold, iou_threshold, batch_size)
        if error is not None:
            failed.append(f"{job.source}: {error}")
            log.warning("%s", failed[-1])
        if frames:
            num_videos += 1
            num_frames += frames
            num_detections += found
            logs.append(str((out_dir / job.output).with_suffix(".jsonl")))
    return PredictResult(
        out_dir=str(out_dir),
        logs=tuple(logs),
        num_images=num_images,
        num_videos=num_videos,
        num_frames=num_frames,
        num_detections=num_detections,
        failed=tuple(failed),
    )


def _predict_images(
    detector: Detector, images: list[_Job], out_dir: Path, conf_threshold: float, iou_threshold: float,
    batch_size: int, failed: list[str],
) -> tuple[int, int]:  # fmt: skip
    """The daemon's inference, message and annotate stages on still images (each its own stream, untracked);
    (images annotated, detections)."""
    streams = [str(job.output) for job in images]
    metrics = Metrics(streams)
    submit = SubmitStage(detector, conf_threshold, iou_threshold)
    results = ResultsStage(detector, metrics)
    annotate = AnnotateStage(detector.class_names, draw_timestamp=False)
    count = found = 0
    with open(out_dir / IMAGES_LOG, "wb") as log_file, tqdm(
        total=len(images), desc="images", unit="img", dynamic_ncols=True
    ) as bar:
        for start in range(0, len(images), batch_size):
            chunk, frames = images[start : start + batch_size], []
            for job in chunk:
                try:
                    image = read_image(job.source)
                    letterbox_hw(image.shape[:2], detector.input_hw)
                except (OSError, ValueError) as exc:
                    failed.append(f"{job.source}: {str(exc).removeprefix(f'{job.source}: ')}")
                    log.warning("%s; skipped", failed[-1])
                else:
                    frames.append(Frame(str(job.output), 0, 0.0, image, decoded_at=time.time()))
            if frames:
                for in_flight in submit.process(Batch(tuple(frames), time.time())):
                    for found_in in results.process(in_flight):
                        (result,) = MessageStage(found_in.stream_id, results.model, metrics).process(found_in)
                        (annotated,) = annotate.process(result)
                        output = out_dir / result.stream_id
                        output.parent.mkdir(parents=True, exist_ok=True)
                        if not cv2.imwrite(str(output), annotated.image):
                            raise OSError(f"{output}: cannot be written")
                        log_file.write(result.message + b"\n")
                        count += 1
                        found += len(result.detections)
            bar.update(len(chunk))
    return count, found


def _predict_video(
    detector: Detector, job: _Job, out_dir: Path, conf_threshold: float, iou_threshold: float, batch_size: int
) -> tuple[int, int, str | None]:
    """One video through the daemon's pipeline; (frames annotated, detections, error or None)."""
    stream_id = re.sub(r"[^A-Za-z0-9._-]+", "-", job.output.stem).lstrip("._-")[:64] or "video"  # a valid id
    work = out_dir / f".{stream_id}.work"
    stream = StreamConfig.model_validate(
        {
            "id": stream_id,
            "source": str(job.source.resolve()),
            "queue": {"size": 2 * batch_size, "policy": "block"},  # a file: no frame lost
            "segment_s": _ONE_SEGMENT_S,
            "record": {"dir": str(work), "codec": "libx264", "crf": 20},
            "detection_log": {"dir": str(work)},
        }
    )
    config = StreamdConfig.model_construct(  # validated parts; the model is the detector given, not a file
        model=out_dir,
        backend=None,
        batch=BatchConfig(max_batch=batch_size, max_wait_ms=0),
        thresholds=ThresholdsConfig(conf_threshold=conf_threshold, iou_threshold=iou_threshold),
        streams=[stream],
        publish=None,
        drain_timeout_s=10.0,
    )
    try:
        summary = run_pipeline(config, switches=Switches(publish=False), detector=detector)
        (counts,) = summary.streams
        recordings = sorted(work.glob("*.mp4"))
        logs = sorted(work.glob("*.jsonl"))
        error = summary.error or counts.end_error
        if counts.processed == 0:
            return 0, 0, error or "no frame could be decoded"
        target = out_dir / job.output
        target.parent.mkdir(parents=True, exist_ok=True)
        for index, path in enumerate(recordings):  # one, unless the video runs past a day
            path.replace(target if index == 0 else target.with_name(f"{target.stem}_{index}.mp4"))
        with open(target.with_suffix(".jsonl"), "wb") as joined:
            for path in logs:
                joined.write(path.read_bytes())
        if error is not None:
            error = f"failed after {counts.processed} frames ({error}); the annotated video stops there"
        return counts.processed, counts.detections, error
    finally:
        shutil.rmtree(work, ignore_errors=True)
