"""`streamd replay`, end to end: the sources, each model with its progress bar, then the report.

Ctrl-C (SIGINT) or SIGTERM stops the model being replayed: the pipeline drains, every log line is whole, the
models not started are skipped and no report is written (it would compare unequal runs); exit 130.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from streamd.replay.errors import ReplayError
from streamd.replay.report import build_report, write_report
from streamd.replay.run import ModelRun, expected_frames, find_sources, model_folder_names, replay_model
from streamd.replay.truth import read_truth

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What `replay` did: each model's run, and the report's paths (None when interrupted or failed)."""

    runs: tuple[ModelRun, ...]
    report_json: Path | None
    report_html: Path | None

    @property
    def interrupted(self) -> bool:
        return any(run.stopped_by == "stop" for run in self.runs)


def replay(
    source_paths: Sequence[Path], bundles: Sequence[Path], out_dir: Path, *, backend: str = "auto",
    truth_path: Path | None = None, console: Console | None = None,
) -> ReplayResult:  # fmt: skip
    """Replay every model over the sources into out_dir, one progress bar per model, then write the report.

    Raises ReplayError (a source, the truth file, an output folder) or another FatalError (a bundle, a backend)
    before any model runs where it can; a stream that fails while running is named in the run's errors.
    """
    console = console or Console(stderr=True)
    if not 1 <= len(bundles) <= 2:
        raise ReplayError(f"--model: one or two bundles, got {len(bundles)}")
    sources = find_sources(source_paths)
    names = model_folder_names(bundles)
    truth = None
    if truth_path is not None:
        from streamd.model.bundle import load_bundle

        truth = read_truth(truth_path, tuple(load_bundle(bundles[0]).meta.class_names))
    total = sum(expected_frames(s) for s in sources) or None
    out_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    runs: list[ModelRun] = []
    with _stop_on_signals(stop), Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as progress:  # fmt: skip
        for bundle, name in zip(bundles, names):
            if stop.is_set():
                break
            task = progress.add_task(name, total=total)
            run = replay_model(bundle, name, sources, out_dir, backend=backend, stop=stop,
                               on_frames=lambda n, task=task: progress.update(task, completed=n))  # fmt: skip
            progress.update(task, total=run.frames, completed=run.frames)
            runs.append(run)
    for run in runs:
        console.print(f"{run.name}: {run.frames} frames in {run.duration_s:.1f} s, {run.fps:.1f} frames/s in the "
                      f"pipeline ({run.pipeline_s:.1f} s), "
                      f"ended by {run.stopped_by}; logs in {run.log_dir}", soft_wrap=True)  # fmt: skip
    if stop.is_set() or any(run.errors for run in runs):
        return ReplayResult(tuple(runs), None, None)
    report = build_report(runs, sources, backend, truth, truth_path)
    json_path, html_path = write_report(report, out_dir, sources)
    return ReplayResult(tuple(runs), json_path, html_path)


class _stop_on_signals:
    """Within the block, SIGINT and SIGTERM set `stop` (the second one too: the drain is bounded by the
    pipeline's drain_timeout_s); the previous handlers come back after it."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum: int, _frame) -> None:
        if not self.stop.is_set():
            log.warning("%s: stopping the replay (the logs keep every frame done)", signal.Signals(signum).name)
        self.stop.set()

    def __enter__(self) -> _stop_on_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
