"""The loops every thread of the pipeline runs, and the state they share.

- `run_source`: a producer. Open (again, after a back-off, for a live
  source), read, put into the stream's input queue; its end-of-stream goes
  out in `finally`, whatever happened.
- `run_worker`: a consumer, the same loop for every other thread. Get from
  the worker's inbox (a queue, or the batcher), hand the item to its stages,
  route their outputs along the graph's flows; give back the credits its
  frames still hold in the queues this worker feeds; forward each
  end-of-stream; end when every stream that reaches it has ended; close its
  stages.
- `run_ticker`: a periodic control item (the heartbeat) into its queue until
  the run is over.

Errors are classified at the stage boundary (`_Runner.deliver`):

- RecoverableError: logged, counted in `errors`, the item skipped (its
  frames' credits given back).
- Anything else from a stage of one stream (a recorder on a full disk):
  that stage stops for that stream (closed, its items dropped and counted
  as "NAME failed"), and is set up again after `retry_s` to try again.
  Detection, publishing and the other streams go on.
- Anything else from a shared stage (inference, the publisher): fatal. The
  run stops with that error; the worker keeps draining its inbox
  (discarding, counted as "failed") until end-of-stream, so no producer
  waits forever.
- Anything a source raises is its stream's error: a live source reconnects,
  a file's stream ends with it. Other streams go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from streamd.errors import RecoverableError, StreamdError
from streamd.ops.logging import stream_extra
from streamd.ops.metrics import Metrics
from streamd.pipeline.graph import Node, Worker
from streamd.pipeline.queues import BoundedQueue, Empty, Full
from streamd.pipeline.stage import Ending, Source
from streamd.types import EndOfStream, Frame

log = logging.getLogger(__name__)

TICK_S = 0.1  # every blocking get/put waits at most this long before looking at the stop event again
RETRY_S = 5.0  # a failed stage of one stream is set up again after this long (doubling up to RETRY_MAX_S)
RETRY_MAX_S = 60.0
FLAPPING_S = 5.0  # a live source lost again within this long of reopening is flapping: its waits double


class Control:
    """What every worker shares: the stop event, the drain deadline, heartbeats and the run's first error.

    stop(reason): sources stop reading, the rest drains. fail(message): a
    fatal error; stops the run, and calls the on_fail callbacks (the batcher
    stops honouring credits, so frames are taken and discarded).
    """

    def __init__(self, stop_event: threading.Event, metrics: Metrics):
        self.stop_event = stop_event
        self.metrics = metrics
        self.error: str | None = None
        self.stop_reason: str | None = None
        self.beats: dict[str, float] = {}
        self.give_up_at: float | None = None  # monotonic; set when the drain budget after a stop runs out
        self._lock = threading.Lock()
        self._on_fail: list[Callable[[], None]] = []
        # Gives back the credits of frames whose results will not come (the graph's batcher sets it).
        self.release_credits: Callable[[tuple[Frame, ...]], None] = lambda frames: None
        self.finished = threading.Event()  # the workers are done: tickers stop
        # The supervisor watching the run (set when it starts, after READY=1): /healthz asks it what is silent.
        self.supervisor: Any | None = None

    def on_fail(self, callback: Callable[[], None]) -> None:
        self._on_fail.append(callback)

    def stop(self, reason: str) -> None:
        """Ask the pipeline to stop (first reason wins): sources stop reading, the rest drains."""
        with self._lock:
            self.stop_reason = self.stop_reason or reason
        self.stop_event.set()

    def fail(self, message: str) -> None:
        with self._lock:
            first = self.error is None
            self.error = self.error or message
        log.error("%s", message)
        self.stop("error")
        if first:
            for callback in self._on_fail:
                callback()

    def beat(self, worker: str) -> None:
        self.beats[worker] = time.monotonic()

    def gave_up(self) -> bool:
        return self.give_up_at is not None and time.monotonic() > self.give_up_at

    def put(self, q: BoundedQueue, item: Any, worker: str) -> bool:
        """Put with the protocol's timeouts; False (counted as a shutdown drop) if the drain budget ran out first."""
        while True:
            try:
                q.put(item, timeout_s=TICK_S)
                return True
            except Full:
                self.beat(worker)
                if self.gave_up():
                    self.metrics.count_dropped(item, "shutdown")
                    return False


def describe(where: str, exc: BaseException) -> str:
    """One line for logs and the run's error: StreamdErrors already say what failed; others get their type."""
    if isinstance(exc, StreamdError):
        return str(exc)
    return f"{where}: {type(exc).__name__}: {exc}"


# --- the producer --------------------------------------------------------------------------------------


def run_source(node: Node, out: BoundedQueue, control: Control, max_frames: int | None) -> None:
    """Read one source into its input queue until it ends, the run stops, or max_frames; then its end-of-stream.

    A live source that is lost is an outage (counted once, logged once): it is
    tried again every backoff.initial_s until it opens, so it is back within
    about that of returning, however long it was away. One that is lost again
    within FLAPPING_S of coming back waits twice as long each time, up to
    backoff.max_s. A file's error ends its stream.
    """
    source: Source = node.obj
    sid, worker, extra = source.stream_id, node.name, stream_extra(source.stream_id)
    backoff = source.backoff
    wait_s = backoff.initial_s
    error: str | None = None
    opened = False
    opened_at: float | None = None  # monotonic: the last successful open
    lost_at: float | None = None  # monotonic: when the current outage began
    count = 0
    try:
        while not control.stop_event.is_set():
            control.beat(worker)
            try:
                if not opened:
                    source.open()
                    opened, opened_at = True, time.monotonic()
                    control.metrics.source_state(sid, "running")
                    if lost_at is not None:
                        control.metrics.count(sid, "reconnects")
                        log.info("back after an outage of %.1f s", opened_at - lost_at, extra=extra)
                        lost_at = None
                    else:
                        log.info("connected", extra=extra)
                frame = source.read()
            except Exception as exc:  # whatever a source raises is its own stream's error
                text = describe(f"source {sid}", exc)
                log.debug("source error", exc_info=True, extra=extra)
                if not source.live:
                    control.metrics.error(sid, text)
                    error = text
                    log.error("%s; this stream ends, the others go on", text, extra=extra)
                    break
                now = time.monotonic()
                if lost_at is None:  # a new outage
                    lost_at = now
                    control.metrics.count(sid, "outages")
                    control.metrics.source_state(sid, "reconnecting")
                    control.metrics.error(sid, text)
                    flapping = opened_at is not None and now - opened_at < FLAPPING_S
                    wait_s = min(wait_s * 2, backoff.max_s) if flapping else backoff.initial_s
                    log.warning("lost: %s; trying again every %.1f s", text, wait_s, extra=extra)
                else:
                    log.debug("still away: %s", text, extra=extra)
                opened = False
                control.stop_event.wait(wait_s)
                continue
            if frame is None:
                log.info("end of stream after %d frames", count, extra=extra)
                break
            control.metrics.count(sid, "frames_in")
            control.metrics.observe(frame)  # the stream's state (outage, clock jump, frozen) before any queue
            if not control.put(out, frame, worker):
                break
            count += 1
            if max_frames is not None and count >= max_frames:
                log.info("stopping after --max-frames %d", max_frames, extra=extra)
                break
    finally:
        try:
            source.close()
        except Exception as exc:
            log.warning("close failed: %s", describe("close", exc), extra=extra)
        if error is not None:
            control.metrics.ended(sid, error)
        control.metrics.source_state(sid, "failed" if error is not None else "ended")
        control.put(out, EndOfStream(sid, error=error), worker)


# --- the consumer --------------------------------------------------------------------------------------


class _Failure:
    """A stage of one stream that failed: why, and when to set it up again."""

    __slots__ = ("error", "retry_at", "wait_s")

    def __init__(self, error: str, wait_s: float):
        self.error = error
        self.wait_s = wait_s
        self.retry_at = time.monotonic() + wait_s


class _Runner:
    """One worker's state: the nodes it runs, the failed ones, whether a shared stage of it failed."""

    def __init__(self, worker: Worker, control: Control):
        self.worker = worker
        self.control = control
        self.failures: dict[int, _Failure] = {}
        # Set up again but not yet through an item: a stage that opens and then fails at once (a recorder on a
        # disk that is still full) keeps doubling its wait instead of being "back" every RETRY_S.
        self.probation: dict[int, _Failure] = {}
        self.fatal = False

    def deliver(self, node: Node, item: Any) -> None:
        """node.process(item) with its errors classified, then its outputs along its flows."""
        if not self._ready(node, item):
            return
        try:
            outputs = list(node.obj.process(item))
        except RecoverableError as exc:
            for stream_id in sorted({item.stream_id} if item.stream_id is not None else {f.stream_id for f in item.frames}):
                self.control.metrics.error(stream_id, str(exc))
            log.warning("%s: %s (item skipped)", node.name, exc, extra=stream_extra(item.stream_id))
            self.gone(item)
            return
        except Exception as exc:
            if node.stream is None:
                raise  # a shared stage: fatal (run_worker records it)
            previous = self.probation.pop(id(node), None)
            self._fail(node, describe(node.name, exc), previous.wait_s * 2 if previous is not None else None)
            self.control.metrics.count_dropped(item, f"{node.obj.name} failed")
            self.gone(item)
            return
        if (recovered := self.probation.pop(id(node), None)) is not None:
            log.info("%s works again after: %s", node.name, recovered.error, extra=stream_extra(node.stream))
        for output in outputs:
            self.emit(node, output)

    def _ready(self, node: Node, item: Any) -> bool:
        """False while the node is failed and not yet due for its retry (the item is dropped and counted)."""
        failure = self.failures.get(id(node))
        if failure is None:
            return True
        if time.monotonic() >= failure.retry_at:
            try:
                node.obj.setup()
            except Exception as exc:
                self._fail(node, describe(f"{node.name} setup", exc), failure.wait_s * 2)
            else:
                self.probation[id(node)] = self.failures.pop(id(node))  # "works again" once an item got through
                return True
        self.control.metrics.count_dropped(item, f"{node.obj.name} failed")
        self.gone(item)
        return False

    def _fail(self, node: Node, text: str, wait_s: float | None = None) -> None:
        wait_s = min(RETRY_S if wait_s is None else wait_s, RETRY_MAX_S)
        self.failures[id(node)] = _Failure(text, wait_s)
        self.control.metrics.error(node.stream, text)
        log.error("%s; this output of the stream stops, retrying in %.3g s (the rest goes on)", text, wait_s,
                  extra=stream_extra(node.stream))
        _close(node, self.control, fatal=False)

    def gone(self, item: Any) -> None:
        """An item this worker did not pass on: in the worker before the credited queues (the batcher's), its frames'
        credits come back now, since no later worker will put their results. Further down, the worker that feeds the
        credited queues settles after each item (run_worker), and a worker after them has nothing to give back: a
        release there could take a place a result is still on its way to."""
        if self.worker.holds_credits:
            self.control.release_credits(item.frames)

    def emit(self, node: Node, item: Any) -> None:
        """Route one output of `node`: into its queues, and through its direct flows."""
        sid = item.stream_id
        for flt, q in node.queued:
            if flt is None or flt == sid:
                self.control.put(q, item, self.worker.name)
        for flt, child in node.direct:
            if flt is None or flt == sid:
                self.deliver(child, item)

    def end(self, node: Node, end: EndOfStream) -> None:
        """Forward an end-of-stream along every flow of `node` that carries its stream, after what the node has to
        say at the end (an Ending stage: a tracker's last events)."""
        if isinstance(node.obj, Ending) and id(node) not in self.failures:
            try:
                for output in list(node.obj.end(end)):
                    self.emit(node, output)
            except Exception as exc:
                log.warning("%s", describe(f"{node.name} end", exc), extra=stream_extra(end.stream_id))
        for flt, q in node.queued:
            if flt is None or flt == end.stream_id:
                self.control.put(q, end, self.worker.name)
        for flt, child in node.direct:
            if flt is None or flt == end.stream_id:
                self.end(child, end)


def run_worker(worker: Worker, control: Control, failed_at_setup: dict[int, str] | None = None) -> None:
    """Consume the worker's inbox until every stream that reaches it has ended; then close its stages.

    failed_at_setup: id(node) -> why, for stages of one stream whose setup() failed before the start (a
    folder on a full disk): they start failed and are set up again after RETRY_S, like a failure later.
    """
    runner = _Runner(worker, control)
    for node in worker.nodes():
        if id(node) in (failed_at_setup or {}):
            runner.failures[id(node)] = _Failure(failed_at_setup[id(node)], RETRY_S)
    waiting = set(worker.streams)
    try:
        while waiting:
            try:
                item = worker.inbox.get(TICK_S)
            except Empty:
                control.beat(worker.name)
                if control.gave_up():
                    break
                continue
            control.beat(worker.name)
            if isinstance(item, EndOfStream):
                waiting.discard(item.stream_id)
                for root in worker.roots:
                    if item.stream_id in root.streams:
                        runner.end(root, item)
                continue
            if runner.fatal:
                control.metrics.count_dropped(item, "failed")
                runner.gone(item)
                continue
            try:
                for root in worker.roots:
                    runner.deliver(root, item)
            except Exception as exc:
                runner.fatal = True
                control.fail(describe(worker.name, exc))
            if worker.settles and item.frames:  # a result that did not come holds its place no longer
                keys = [frame.key for frame in item.frames]
                for q in worker.settles:
                    q.release(keys)
    finally:
        for node in worker.nodes():
            if id(node) not in runner.failures:  # a failed stage was closed when it failed
                _close(node, control, fatal=node.stream is None)


def run_ticker(node: Node, out: BoundedQueue, control: Control) -> None:
    """Put node.obj.tick() into `out` every every_s until the workers are done; a tick that finds the queue
    full is skipped (its consumer is behind: a newer one follows), so a stuck consumer does not pile them up."""
    ticker = node.obj
    while not control.finished.wait(ticker.every_s):
        if len(out) >= out.maxsize:
            log.debug("%s skipped: %s is full", node.name, out.name)
            continue
        try:
            item = ticker.tick(control.stop_event.is_set())
        except Exception as exc:  # the heartbeat is a report: its failure is logged, the pipeline goes on
            log.warning("%s", describe(node.name, exc))
            continue
        out.put(item, timeout_s=0)


def _close(node: Node, control: Control, *, fatal: bool) -> None:
    try:
        node.obj.close()
    except Exception as exc:
        text = describe(f"{node.name} close", exc)
        if fatal:
            control.fail(text)
        else:
            control.metrics.error(node.stream, text)
            log.warning("%s", text, extra=stream_extra(node.stream))
