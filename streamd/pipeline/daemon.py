"""One owner for what a run shares: the detector (bundle and backend) and the process's one ZeroMQ context.

`run_pipeline` loads the bundle, makes the backend, creates the context,
composes the graph, serves /metrics and /healthz when the config asks
(streamd.ops.prometheus), sweeps the retention (streamd.retention) while the
graph runs, and closes what it created, in reverse order, whatever happened.
A caller that brings its own Detector (a benchmark, `trainer predict`) keeps
it, and closes its backend itself.
"""

from __future__ import annotations

import threading
import time

import zmq

from streamd.backends.select import make_backend
from streamd.config import StreamdConfig
from streamd.hardware import prepare_primary_context
from streamd.model.bundle import load_bundle
from streamd.detector import Detector
from streamd.ops.metrics import Metrics, RunSummary
from streamd.ops.prometheus import MetricsServer, RunCollector
from streamd.ops.systemd import SystemdNotifier
from streamd.pipeline.compose import Switches, compose
from streamd.pipeline.endpoints import endpoints
from streamd.pipeline.graph import Graph
from streamd.pipeline.runner import Runner
from streamd.pipeline.worker import Control
from streamd.retention import RetentionWorker
from streamd.selftest import SelfTestResult, self_test
from streamd.stages.record import RecordStage


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
    selftest: SelfTestResult | None = None
    if detector is None:
        bundle = load_bundle(config.model)
        prepare_primary_context(config)  # before the backend's first CUDA allocation: NVDEC shares its context
        detector = Detector.for_bundle(bundle, make_backend(bundle, config.backend, max_batch=config.batch.max_batch))
    runner: Runner | None = None
    server: MetricsServer | None = None
    retention: RetentionWorker | None = None
    publishing = switches.publish and config.publish is not None and config.publish.enabled
    context = zmq.Context() if publishing else None
    try:
        if owns_backend:  # golden frames through this backend before READY=1; a mismatch is a BundleError
            selftest = self_test(bundle, detector, config.backend)
        metrics = Metrics([stream.id for stream in config.streams])
        ends = endpoints(config, detector, metrics, context, switches)
        graph = compose(config, detector, metrics, ends, wall_clock=switches.wall_clock)
        runner = Runner(
            graph, stop_event or threading.Event(), drain_timeout_s=config.drain_timeout_s,
            max_frames=max_frames, duration_s=duration_s, notifier=notifier,
        )  # fmt: skip
        if config.metrics is not None:
            server = _metrics_server(config.metrics.bind, graph, runner.control, selftest)
            server.start()  # before setup and READY=1: /healthz says "starting" until the supervisor watches
        retention = RetentionWorker.for_config(config, metrics)  # its own thread: it must work while outputs wait
        retention.start()
        return runner.run()
    finally:
        if retention is not None:
            retention.close()
        if server is not None:
            server.close()
        left_behind = runner is not None and bool(runner.left_behind)
        if context is not None:
            if left_behind:
                context.destroy(linger=0)  # a stuck publisher never closed its socket: do not wait for it
            else:
                context.term()
        if owns_backend and not left_behind:
            detector.backend.close()


def _metrics_server(bind: str, graph: Graph, control: Control, selftest: SelfTestResult | None) -> MetricsServer:
    """/metrics over the run's Metrics, every queue of the graph, its recorders and the self-test; /healthz from
    its supervisor."""
    queues = graph.queues()
    recorders = [stage for stage in graph.stages() if isinstance(stage, RecordStage)]
    states = lambda: {stream_id: state.state for stream_id, (state, _, _) in graph.metrics.states().items()}  # noqa: E731
    return MetricsServer(bind, RunCollector(graph.metrics, queues, recorders, selftest), lambda: _silent(control), states)


def _silent(control: Control) -> list[str] | None:
    """/healthz's question to the run's supervisor: what keeps the watchdog unfed now (None: not running yet)."""
    supervisor = control.supervisor  # set when the runner starts watching (after READY=1)
    return None if supervisor is None else supervisor.silent(time.monotonic())
