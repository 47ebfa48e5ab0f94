"""Each model over the replay's sources, through the daemon's own pipeline (`run_pipeline`), as it runs files.

Every source is one stream of one run (up to 64, the config's limit, per run): read as fast as it decodes
(no pacing), `block` queues (no frame dropped), the same stages and tracker, the same messages
(streamd.detections/3 and streamd.track/1), written as detection logs under OUT/<model name>/. What makes two
replays of the same source, bundle and backend write the same bytes:

- the messages carry no wall-clock field (`Switches(wall_clock=False)`: captured_at counts from the epoch by
  the frame's pts, latencies are 0), and the log's segment names follow from it;
- batches of one frame (`max_batch` 1, `max_wait_ms` 0): ONNX Runtime may sum in another order in a batch of
  several frames, so a frame's boxes could depend on which frames shared its batch, which depends on timing.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import av

from streamd.config import StreamdConfig
from streamd.errors import ConfigError
from streamd.model.bundle import load_bundle
from streamd.ops.metrics import RunSummary
from streamd.pipeline.compose import Switches
from streamd.replay.errors import ReplayError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mkv", ".mov", ".ts", ".m2ts", ".mts", ".avi", ".webm"})
MAX_STREAMS_PER_RUN = 64  # StreamdConfig.streams' bound
SEGMENT_S = 3600.0  # a replay's log segment: an hour of the source's time
FRAME_LINE = b'{"schema":"streamd.detections/'  # how a frame's line starts (messages.encode: compact, schema first)
BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """A video file to replay and the stream id its messages carry (its file name, made a valid id)."""

    stream_id: str
    path: Path


@dataclass(frozen=True, slots=True)
class ModelRun:
    """One model's replay: where its logs are, how many frames it processed, how long it took.

    duration_s: wall clock, the bundle's loading and self-test included; pipeline_s: the pipelines' own runs
    (RunSummary.duration_s: set-up and warm-up of the stages, then every frame).
    stopped_by: "end" (every source to its end), "stop" (interrupted: the logs hold the frames done) or "error".
    """

    name: str
    sha256: str
    class_names: tuple[str, ...]
    bundle: Path
    log_dir: Path
    frames: int
    duration_s: float
    pipeline_s: float
    stopped_by: str
    errors: tuple[str, ...]

    @property
    def fps(self) -> float:
        """Frames per second of the pipeline (pipeline_s), every source together: the file speed."""
        return self.frames / self.pipeline_s if self.pipeline_s > 0 else 0.0


def find_sources(paths: Sequence[Path]) -> tuple[ReplaySource, ...]:
    """The video files named, a folder standing for the video files in it (sorted by name: archive segments
    are named by their start). Each gets a unique stream id from its file name.

    Raises ReplayError naming a path that is missing, or a folder with no video file.
    """
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise ReplayError(f"{path}: no video file in this folder ({', '.join(sorted(VIDEO_SUFFIXES))})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ReplayError(f"{path}: no such file or folder")
    sources, taken = [], set()
    for path in files:
        base = (re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip("._-") or "source")[:58]
        stream_id, n = base, 1
        while stream_id in taken:
            n += 1
            stream_id = f"{base}-{n}"
        taken.add(stream_id)
        sources.append(ReplaySource(stream_id, path.resolve()))
    return tuple(sources)


def expected_frames(source: ReplaySource) -> int:
    """The source's frame count as its container states it, else duration x frame rate (0 if neither is
    known): the progress bar's total, not a promise."""
    try:
        with av.open(str(source.path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            rate = stream.average_rate or stream.guessed_rate
            if container.duration and rate:
                return round(container.duration / av.time_base * float(rate))
    except (av.FFmpegError, IndexError) as exc:
        raise ReplayError(f"{source.path}: not a video PyAV can open: {exc}") from exc
    return 0


def replay_config(bundle: Path, backend: str, sources: Sequence[ReplaySource], log_dir: Path) -> StreamdConfig:
    """The daemon's config for one model over these sources: files as fast as they decode, batch 1, tracking as
    the daemon's default, a detection log per stream in log_dir, no recording, no publishing."""
    if backend not in BACKENDS:
        raise ReplayError(f"--backend {backend!r}: one of {', '.join(BACKENDS)}")
    return StreamdConfig.model_validate({
        "model": str(bundle),
        "backend": {"type": backend},
        "batch": {"max_batch": 1, "max_wait_ms": 0},
        "streams": [
            {"id": s.stream_id, "source": str(s.path), "segment_s": SEGMENT_S, "detection_log": {"dir": str(log_dir)}}
            for s in sources
        ],
    })  # fmt: skip


def model_folder_names(bundles: Sequence[Path]) -> tuple[str, ...]:
    """Each bundle's output folder: its model name, with the first 12 hex of its sha256 when two bundles have the
    same name (a retrained model that kept its name).

    Raises ReplayError when the bundles' classes differ: boxes are compared class by class.
    """
    loaded = [load_bundle(b) for b in bundles]
    for bundle in loaded[1:]:
        if bundle.meta.class_names != loaded[0].meta.class_names:
            raise ReplayError(f"{bundle.path}: classes {', '.join(bundle.meta.class_names)} differ from "
                              f"{loaded[0].path}'s ({', '.join(loaded[0].meta.class_names)}): only models of the "
                              "same classes are compared")
    names = [b.meta.name for b in loaded]
    return tuple(
        f"{b.meta.name}-{b.sha256[:12]}" if names.count(b.meta.name) > 1 else b.meta.name for b in loaded
    )


def replay_model(
    bundle: Path,
    folder_name: str,
    sources: Sequence[ReplaySource],
    out_dir: Path,
    *,
    backend: str = "auto",
    stop: threading.Event | None = None,
    on_frames: Callable[[int], None] | None = None,
) -> ModelRun:
    """Run one model over every source; its logs go to out_dir/folder_name, which must hold no log yet.

    on_frames(n): called about 4 times a second with the frames logged so far (the progress bar).
    stop: set it (Ctrl-C) to end the run early: the pipeline drains and closes its logs, every line whole.
    Raises ReplayError when the folder already holds logs, FatalError when the pipeline cannot start.
    """
    from streamd.pipeline.daemon import run_pipeline  # the media stack and the backends: only when replaying

    stop = stop or threading.Event()
    log_dir = out_dir / folder_name
    if log_dir.exists() and any(log_dir.glob("*.jsonl")):
        raise ReplayError(f"{log_dir}: already holds detection logs (a log is appended to): choose another -o")
    loaded = load_bundle(bundle)
    counter = LogCounter(log_dir)
    started = time.monotonic()
    summaries: list[RunSummary] = []
    watcher = threading.Thread(target=_watch, args=(counter, on_frames, done := threading.Event()), daemon=True)
    watcher.start()
    try:
        for first in range(0, len(sources), MAX_STREAMS_PER_RUN):
            if stop.is_set():
                break
            chunk = sources[first:first + MAX_STREAMS_PER_RUN]
            try:
                config = replay_config(bundle, backend, chunk, log_dir)
            except ValueError as exc:  # pydantic: a source or bundle the config refuses
                raise ConfigError(f"replay of {bundle}: {exc}") from exc
            summaries.append(run_pipeline(config, stop, switches=Switches(
                record=False, detection_log=True, publish=False, wall_clock=False,
            )))  # fmt: skip
    finally:
        done.set()
        watcher.join()
    if on_frames is not None:
        on_frames(counter.update())
    errors = tuple(
        [s.error for s in summaries if s.error]
        + [f"{f.stream_id}: {f.end_error}" for s in summaries for f in s.failed_streams]
    )
    stopped_by = "error" if errors else "stop" if stop.is_set() else "end"
    return ModelRun(
        name=folder_name, sha256=loaded.sha256, class_names=tuple(loaded.meta.class_names),
        bundle=bundle, log_dir=log_dir, frames=sum(s.processed for s in summaries),
        duration_s=time.monotonic() - started, pipeline_s=sum(s.duration_s for s in summaries),
        stopped_by=stopped_by, errors=errors,
    )  # fmt: skip


class LogCounter:
    """Counts the frame lines written so far to the logs of a folder, reading only what is new each time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self.frames = 0

    def update(self) -> int:
        """The frame lines in the folder's .jsonl files now (a line still being written is not counted)."""
        for path in sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else ():
            with path.open("rb") as file:
                file.seek(self._offsets.get(path, 0))
                data = self._partial.get(path, b"") + file.read()
                self._offsets[path] = file.tell()
            *lines, self._partial[path] = data.split(b"\n")
            self.frames += sum(line.startswith(FRAME_LINE) for line in lines)
        return self.frames


def _watch(counter: LogCounter, on_frames: Callable[[int], None] | None, done: threading.Event) -> None:
    while on_frames is not None and not done.wait(0.25):
        on_frames(counter.update())
