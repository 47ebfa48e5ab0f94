"""One owner for what a run shares: the detector (bundle and backend) and the process's one ZeroMQ context.

`run_pipeline` loads the bundle, makes the backend, creates the context,
composes the graph, runs it, and closes what it created, in reverse order,
whatever happened. A caller that brings its own Detector (a benchmark,
`trainer predict`) keeps it, and closes its backend itself.
"""

from __future__ import annotations

import threading

import zmq

from streamd.backends.select import make_backend
from streamd.config import StreamdConfig
from streamd.model.bundle import load_bundle
from streamd.model.detector import Detector
from streamd.ops.metrics import Metrics, RunSummary
from streamd.ops.systemd import SystemdNotifier
from streamd.pipeline.compose import Switches, compose
from streamd.pipeline.runner import Runner


def run_pipeline(
    config: StreamdConfig,
    stop_event: threading.Event | None = None,
    *,
    switches: Switches = Switches(),
    max_frames: int | None = None,
    duration_s: float | None = None,
    notifier: SystemdNotifier | None = None,
    detector: Detector | None = None,
) -> RunSummary:
    """Build and run the daemon's pipeline until its sources end, `stop_event` is set, or a limit is reached.

    For programs (the CLI, a benchmark, trainer predict): switches turn
    recording, the detection log or publishing off; detector: one already
    loaded (then config.model and config.backend are not read).
    Raises FatalError when the pipeline cannot start (bundle, backend, an
    output's setup); errors while running end up in the summary's `error`.
    """
    owns_backend = detector is None
    if detector is None:
        bundle = load_bundle(config.model)
        detector = Detector.for_bundle(bundle, make_backend(bundle, config.backend, max_batch=config.batch.max_batch))
    runner: Runner | None = None
    publishing = switches.publish and config.publish is not None and config.publish.enabled
    context = zmq.Context() if publishing else None
    try:
        metrics = Metrics([stream.id for stream in config.streams])
        graph = compose(config, detector, metrics, context, switches)
        runner = Runner(
            graph, stop_event or threading.Event(), drain_timeout_s=config.drain_timeout_s,
            max_frames=max_frames, duration_s=duration_s, notifier=notifier,
        )  # fmt: skip
        return runner.run()
    finally:
        left_behind = runner is not None and bool(runner.left_behind)
        if context is not None:
            if left_behind:
                context.destroy(linger=0)  # a stuck publisher never closed its socket: do not wait for it
            else:
                context.term()
        if owns_backend and not left_behind:
            detector.backend.close()
