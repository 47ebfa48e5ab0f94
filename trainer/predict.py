"""Run a detector on images, folders and video files; write annotated copies and a detection log.

`predict(detector, paths, out_dir, ...) -> PredictResult`:

- an image (.jpg .jpeg .png .bmp, any case) gives an annotated image of the
  same name and format;
- a video (.mp4 .mkv .avi .mov .ts) is decoded with PyAV and re-encoded,
  annotated, as H.264 `.mp4` at the source's frame rate, frame for frame;
- a folder is searched recursively for both (skipping `out_dir` itself when
  it lies inside), and its tree is kept under `out_dir/<folder name>/`.

`out_dir/detections.jsonl` gets one line per image or frame:
`{"file", "frame", "pts_s", "model": {"name", "sha256"}, "detections"}`
with detections as in the streamd message schema (source pixels); an
image is frame 0 with pts_s null. A file that cannot be read is
named in a warning, counted, and skipped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO

import av
import cv2
import numpy as np
from tqdm import tqdm

from streamd.draw import draw_detections
from streamd.model.detections import Detections
from trainer.detect import Detector

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".ts"})
DETECTIONS_FILE = "detections.jsonl"


@dataclass(frozen=True, slots=True)
class PredictResult:
    """What `predict` did; `failed` holds one "file: reason" per input that could not be (fully) read."""

    out_dir: str
    detections_path: str
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
    """Annotate every image and video under `paths` into `out_dir`, logging detections to detections.jsonl."""
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
    num_images = num_videos = num_frames = num_detections = 0
    detections_path = out_dir / DETECTIONS_FILE
    with open(detections_path, "w") as log_file:
        with tqdm(total=len(images), desc="images", unit="img", disable=not images, dynamic_ncols=True) as bar:
            for start in range(0, len(images), batch_size):
                chunk, loaded = images[start:start + batch_size], []
                for job in chunk:
                    image = cv2.imread(str(job.source), cv2.IMREAD_COLOR)
                    if image is None:
                        failed.append(f"{job.source}: cannot be read as an image")
                        log.warning("%s; skipped", failed[-1])
                    else:
                        loaded.append((job, image))
                results = detector.detect([im for _, im in loaded], conf_threshold, iou_threshold) if loaded else []
                for (job, image), detections in zip(loaded, results):
                    output = out_dir / job.output
                    output.parent.mkdir(parents=True, exist_ok=True)
                    if not cv2.imwrite(str(output), draw_detections(image, detections, detector.class_names)):
                        raise OSError(f"{output}: cannot be written")
                    _log_line(log_file, detector, job.source, 0, None, detections)
                    num_images += 1
                    num_detections += len(detections)
                bar.update(len(chunk))
        for job in videos:
            frames, detections_count, error = _predict_video(
                detector, job, out_dir, log_file, conf_threshold, iou_threshold, batch_size
            )
            if error is not None:
                failed.append(f"{job.source}: {error}")
                log.warning("%s", failed[-1])
            num_videos += int(frames > 0)
            num_frames += frames
            num_detections += detections_count
    return PredictResult(
        out_dir=str(out_dir),
        detections_path=str(detections_path),
        num_images=num_images,
        num_videos=num_videos,
        num_frames=num_frames,
        num_detections=num_detections,
        failed=tuple(failed),
    )


def _log_line(log_file: IO[str], detector: Detector, source: Path, frame: int, pts_s: float | None,
              detections: Detections) -> None:
    record = {
        "file": str(source),
        "frame": frame,
        "pts_s": pts_s,
        # as in streamd's detection log: every line names the model that made it
        "model": {"name": detector.name, "sha256": detector.sha256},
        "detections": detections.to_records(detector.class_names),
    }
    log_file.write(json.dumps(record) + "\n")


def _predict_video(
    detector: Detector,
    job: _Job,
    out_dir: Path,
    log_file: IO[str],
    conf_threshold: float,
    iou_threshold: float,
    batch_size: int,
) -> tuple[int, int, str | None]:
    """Annotate one video; return (frames written, detections, error or None).

    A decode error stops the video but keeps what was decoded before it: the
    frames already read are annotated and the output is closed properly.
    """
    try:
        container = av.open(str(job.source))
    except (av.FFmpegError, OSError) as exc:
        return 0, 0, f"cannot be opened as a video: {getattr(exc, 'strerror', None) or exc}"
    with container:
        if not container.streams.video:
            return 0, 0, "has no video stream"
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        writer = _VideoWriter(out_dir / job.output, rate)
        pending: list[tuple[int, float | None, np.ndarray]] = []
        frames = detections_count = 0
        error = None

        def flush() -> None:
            nonlocal detections_count
            results = detector.detect([image for _, _, image in pending], conf_threshold, iou_threshold)
            for (index, pts_s, image), detections in zip(pending, results):
                writer.write(draw_detections(image, detections, detector.class_names))
                _log_line(log_file, detector, job.source, index, pts_s, detections)
                detections_count += len(detections)
            pending.clear()

        with writer, tqdm(total=stream.frames or None, desc=job.source.name, unit="frame", leave=False,
                          dynamic_ncols=True) as bar:
            try:
                for frame in container.decode(stream):
                    pending.append((frames, None if frame.time is None else round(frame.time, 6),
                                    frame.to_ndarray(format="bgr24")))
                    frames += 1
                    bar.update()
                    if len(pending) == batch_size:
                        flush()
            except av.FFmpegError as exc:
                error = f"decode failed after {frames} frames: {exc.strerror or exc}; the annotated video stops there"
            if pending:
                flush()
        if frames == 0 and error is None:
            error = "no frame could be decoded"
    return frames, detections_count, error


class _VideoWriter:
    """H.264 .mp4 at a constant frame rate, opened at the first frame (whose size it takes)."""

    def __init__(self, path: Path, rate: Fraction):
        self.path = path
        self.rate = rate
        self.container = None
        self.stream = None
        self.count = 0

    def write(self, image_bgr: np.ndarray) -> None:
        if self.container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), "w")
            self.stream = self.container.add_stream("libx264", rate=self.rate)
            # yuv420p (what every player takes) needs even sizes: an odd last row or column is cut.
            self.stream.width = image_bgr.shape[1] // 2 * 2
            self.stream.height = image_bgr.shape[0] // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "20", "preset": "veryfast"}
        frame = av.VideoFrame.from_ndarray(
            np.ascontiguousarray(image_bgr[: self.stream.height, : self.stream.width]), format="bgr24"
        )
        frame.pts = self.count
        frame.time_base = Fraction(1) / self.rate
        self.container.mux(self.stream.encode(frame))
        self.count += 1

    def __enter__(self) -> _VideoWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.container is not None:
            self.container.mux(self.stream.encode(None))  # drain the encoder's look-ahead
            self.container.close()
