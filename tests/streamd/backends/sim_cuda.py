"""A simulated CUDA runtime for streamd.backends.cuda_slots on the CPU, one that can see time and order.

SimRuntime stands in for cuda_slots.CudaRuntime. Tensors are CPU tensors, but work runs as on a GPU:

- each stream is a worker thread that runs its queue in order, each operation after a random delay of 0-2 ms;
- a copy reads its source when the stream reaches it, not when it is enqueued;
- an event completes when its stream reaches the record; wait_event holds the waiting stream's worker until then,
  and wait()/synchronize() block the calling thread until then;
- code under on(stream) (the model, the letterbox, a graph replay) runs in the calling thread once the stream has
  run everything enqueued before it, with the stream held until it ends: in the stream's order (an operation queued
  on the held stream from inside, such as the frames' upload before the letterbox, runs before the code goes on);
- pinned() buffers are registered as pinned: a non_blocking copy() to or from any other host tensor is refused
  (pageable memory makes CUDA's copy synchronous, or a race with the host when it is not);
- capture() notes the tensors each graph reads and writes; a replay that touches another (a static buffer rebound
  after capture, which a real graph would never see) is refused.

Alongside, a happens-before checker (vector clocks, as CUDA's own stream sanitizer keeps) sees every access to
the runtime's buffers: by the copies, by torch operations of the calling threads (a TorchFunctionMode entered with
guard()), on a stream or on the host. Two accesses to one buffer, one of them a write, with no event, wait or
enqueue order between them are a race, listed in `races` whether or not the random delays made it show in values.
The host threads are one agent: what one of them learnt by a wait counts for all (the daemon hands a batch from
the submit thread to the results thread through a queue, and its slot back through SlotPending's lock, which the
checker does not see). So a stream's access unordered with a later one is certain to be listed only when no
thread waited in between: submit batches from one thread, several in flight, to test that.
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Callable

import torch
from torch.overrides import TorchFunctionMode

MAX_DELAY_S = 0.002
HOST = "host"  # the agent of the host threads (the submit and results threads), ordered by the events they wait on
_METADATA = {"__getitem__", "view", "reshape", "narrow", "size", "dim", "numel", "stride", "data_ptr", "__get__",
             "untyped_storage", "is_contiguous", "storage_offset", "__len__", "__repr__", "__format__"}  # fmt: skip
_THREAD = threading.local()  # per thread: the sim streams made current by on()


def storage_of(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


class SimEvent:
    def __init__(self, kind: str, slot: int):
        self.kind, self.slot = kind, slot
        self.clock: dict[str, int] = {}  # what the last record covers
        self.recorded = self.reached = 0
        self.changed = threading.Condition()

    def _reach(self, generation: int) -> None:
        with self.changed:
            self.reached = max(self.reached, generation)
            self.changed.notify_all()

    def block_until(self, generation: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.reached >= generation, timeout=60):
                raise RuntimeError(f"sim: event {self.kind} {self.slot} never reached record {generation}")


class SimStream:
    """A worker thread running its queue in order, each operation after a random delay."""

    def __init__(self, name: str, rng: random.Random):
        self.name = self.cuda_stream = name
        self.clock: dict[str, int] = {name: 0}
        self.enqueued = self.ran = 0
        self.idle = threading.Condition()
        self.failures: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._rng = rng
        threading.Thread(target=self._work, name=f"sim-{name}", daemon=True).start()

    def enqueue(self, operation: Callable[[], None]) -> int:
        """Queue `operation`; when the calling thread runs code on this stream (on()), it runs before that code goes on:
        the torch operations after it under on() are later on the same stream (a letterbox reads the frames the copy
        just queued), so they must see what it wrote."""
        with self.idle:
            self.enqueued += 1
            position = self.enqueued
        self._queue.put(operation)
        if self in getattr(_THREAD, "streams", []):
            self.drain()
        return position

    def drain(self) -> None:
        with self.idle:
            if not self.idle.wait_for(lambda: self.ran >= self.enqueued, timeout=60):
                raise RuntimeError(f"sim: stream {self.name} did not drain")

    def _work(self) -> None:
        while True:
            operation = self._queue.get()
            threading.Event().wait(self._rng.uniform(0, MAX_DELAY_S))
            try:
                with torch.inference_mode():  # as the calling threads' entry points run (buffers may be inference tensors)
                    operation()
            except Exception as exc:  # a GPU fault: kept for the tests, and the stream goes on
                self.failures.append(f"{self.name}: {exc!r}")
            with self.idle:
                self.ran += 1
                self.idle.notify_all()


class _Tracker(TorchFunctionMode):
    """Every torch operation of a guarded thread on a runtime buffer: an access by the thread's stream or the host."""

    def __init__(self, sim: SimRuntime):
        super().__init__()
        self.sim = sim

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        result = func(*args, **kwargs)
        if name not in _METADATA:
            written = [args[0]] if (name.endswith("_") and not name.startswith("__")) or name in ("__setitem__", "numpy") else []
            written += [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
            # In lists too: YOLOX's Focus stem reads the input only through torch.cat([slices...]).
            tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))
                       if isinstance(t, torch.Tensor)]  # fmt: skip
            self.sim.accessed(tensors, written, result, name, kwargs.get("device") is not None)
        return result


class SimRuntime:
    """cuda_slots.CudaRuntime's calls, simulated on the CPU (the module docstring); `races` lists what was unordered."""

    gpu_name = "Simulated GPU"

    def __init__(self, device, label: str, seed: int = 0):
        self.configured = str(device)
        self.device = torch.device("cpu")
        self.rng = random.Random(seed)
        self.streams: dict[str, SimStream] = {}
        self.host_clock: dict[str, int] = {HOST: 0}
        self.pinned_storages: set[int] = set()
        self.device_storages: set[int] = set()
        self.names: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # allocations stay alive: no storage address is reused under the checker
        self.allocated: set[int] = set()  # their storages
        self.last_write: dict[int, tuple[str, int]] = {}
        self.reads: dict[int, dict[str, int]] = {}
        self.races: list[str] = []
        self._replaying = threading.local()  # per thread (a results thread runs NMS meanwhile): see replaying()
        self.lock = threading.RLock()

    # --- the calls CudaSlots makes ------------------------------------------------------------------------------

    def guard(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if not getattr(_THREAD, "tracking", False):
            _THREAD.tracking = True
            stack.callback(setattr, _THREAD, "tracking", False)
            stack.enter_context(_Tracker(self))
        return stack

    def stream(self, name: str) -> SimStream:
        self.streams[name] = SimStream(name, random.Random(self.rng.random()))
        return self.streams[name]

    def event(self, kind: str, slot: int) -> SimEvent:
        return SimEvent(kind, slot)

    @contextlib.contextmanager
    def on(self, stream: SimStream):
        stream.drain()
        self._advance(stream)
        streams = getattr(_THREAD, "streams", [])
        _THREAD.streams = [*streams, stream]
        try:
            yield
        finally:
            _THREAD.streams = streams

    def handle(self, stream: SimStream) -> str:
        return stream.cuda_stream

    def pinned(self, shape, dtype) -> torch.Tensor:
        return self._allocate(shape, dtype, "pinned", self.pinned_storages)

    def empty(self, shape, dtype) -> torch.Tensor:
        return self._allocate(shape, dtype, "device", self.device_storages)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: SimStream, what: str, slot: int) -> None:
        for side, tensor in (("destination", dst), ("source", src)):
            ptr = storage_of(tensor)
            if ptr not in self.device_storages and ptr not in self.pinned_storages:
                raise AssertionError(f"sim: non_blocking copy {what} (slot {slot}) with a pageable {side} {tuple(tensor.shape)}")
        self._advance(stream)
        self._check(storage_of(src), stream.name, stream.clock, write=False, what=what)
        self._check(storage_of(dst), stream.name, stream.clock, write=True, what=what)
        stream.enqueue(lambda: dst.copy_(src))

    def record(self, event: SimEvent, stream: SimStream) -> None:
        self._advance(stream)
        with event.changed:
            event.recorded += 1
            generation = event.recorded
        event.clock = dict(stream.clock)
        stream.enqueue(lambda: event._reach(generation))

    def wait_event(self, stream: SimStream, event: SimEvent) -> None:
        self._advance(stream)
        generation = event.recorded
        self._merge(stream.clock, event.clock)
        stream.enqueue(lambda: event.block_until(generation))

    def wait(self, event: SimEvent) -> None:
        generation, clock = event.recorded, dict(event.clock)
        event.block_until(generation)
        with self.lock:
            self._merge(self.host_clock, clock)

    def synchronize(self, stream: SimStream) -> None:
        stream.drain()
        with self.lock:
            self._merge(self.host_clock, stream.clock)

    def capture(self, runs: dict[int, Callable[[], None]]) -> dict[int, Callable[[], None]]:
        """Each run once (the warm-up), noting the storages it touches; replays that may touch only those."""
        replays = {}
        for key, run in runs.items():
            captured: set[int] = set()
            self.replaying().append((captured, captured, True))
            try:
                run()
            finally:
                self.replaying().pop()
            replays[key] = self._replay(run, captured)
        return replays

    # --- the checker --------------------------------------------------------------------------------------------

    def accessed(self, tensors: list[torch.Tensor], written: list[torch.Tensor], result, name: str, placed: bool) -> None:
        """A torch operation of a guarded thread read `tensors` and wrote `written`, made `result`; `placed`: it was
        given a device (a factory such as torch.full(..., device=out.device))."""
        ptrs = {storage_of(t) for t in tensors if t.device.type == "cpu"}
        if replaying := self.replaying():
            captured, made, capturing = replaying[-1]
            stray = ptrs - captured - made
            if stray and not capturing:
                self.races.append(f"a graph replay's {name} touched {sorted(self.names.get(p, 'a tensor') for p in stray)}, "
                                  "which the graph did not capture")  # fmt: skip
            if capturing:  # a graph's memory stays its own (its pool): no later allocation gets a captured address
                captured |= ptrs
                self.keep += [*tensors, *(out for out in (result if isinstance(result, (tuple, list)) else (result,))
                                          if isinstance(out, torch.Tensor))]  # fmt: skip
            made |= {storage_of(out) for out in (result if isinstance(result, (tuple, list)) else (result,))
                     if isinstance(out, torch.Tensor)}  # fmt: skip
        streams = getattr(_THREAD, "streams", [])
        agent, clock = (streams[-1].name, streams[-1].clock) if streams else (HOST, self.host_clock)
        written_ptrs = {storage_of(t) for t in written}
        outputs = {storage_of(out) for out in (result if isinstance(result, (tuple, list)) else (result,))
                   if isinstance(out, torch.Tensor) and out.device.type == "cpu"}  # fmt: skip
        with self.lock:
            # A new tensor (not a view of an argument) is a new allocation, perhaps at the address of one freed
            # since: its history starts here, as a caching allocator's block does. Made from device memory or by a
            # factory given a device, it is device memory (the model's own output, say), checked like the runtime's
            # buffers; otherwise it is host memory (torch.empty(n) under on(stream) too), pageable to copy().
            on_device = placed or bool(ptrs & self.device_storages)
            for ptr in outputs - ptrs - written_ptrs - self.allocated:
                self.last_write.pop(ptr, None)
                self.reads.pop(ptr, None)
                if on_device:
                    self.device_storages.add(ptr)
                    self.names[ptr] = f"a tensor made on {agent} by {name}"
                else:
                    self.device_storages.discard(ptr)
            if not streams:
                self.host_clock[HOST] += 1
            for ptr in ptrs | written_ptrs:
                self._check(ptr, agent, clock, write=ptr in written_ptrs, what=name)

    def replaying(self) -> list[tuple[set[int], set[int], bool]]:
        """The calling thread's captures and replays in progress: (captured storages, made by this replay, capturing)."""
        if not hasattr(self._replaying, "stack"):
            self._replaying.stack = []
        return self._replaying.stack

    def _replay(self, run: Callable[[], None], captured: set[int]) -> Callable[[], None]:
        def replay() -> None:
            self.replaying().append((captured, set(), False))
            try:
                run()
            finally:
                self.replaying().pop()

        return replay

    def _allocate(self, shape, dtype, kind: str, registry: set[int]) -> torch.Tensor:
        tensor = torch.full(shape, float("nan")) if dtype.is_floating_point else torch.zeros(shape)  # stale reads show
        tensor = tensor.to(dtype)
        ptr = storage_of(tensor)
        registry.add(ptr)
        self.allocated.add(ptr)
        self.names[ptr] = f"{kind} {tuple(shape)}"
        self.keep.append(tensor)
        return tensor

    def _advance(self, stream: SimStream) -> None:
        """A new position on `stream`, after everything the host did before enqueueing it."""
        with self.lock:
            self._merge(stream.clock, self.host_clock)
            stream.clock[stream.name] += 1

    @staticmethod
    def _merge(into: dict[str, int], other: dict[str, int]) -> None:
        for agent, position in other.items():
            into[agent] = max(into.get(agent, 0), position)

    def _check(self, ptr: int, agent: str, clock: dict[str, int], write: bool, what: str) -> None:
        if ptr not in self.device_storages and ptr not in self.pinned_storages:
            return
        with self.lock:
            position = clock[agent]
            earlier = [self.last_write[ptr]] if ptr in self.last_write else []
            if write:
                earlier += list(self.reads.get(ptr, {}).items())
            for other, other_position in earlier:
                if other != agent and clock.get(other, 0) < other_position:
                    self.races.append(f"{what} on {agent} {'writes' if write else 'reads'} {self.names[ptr]} unordered "
                                      f"with {other}'s access #{other_position}")  # fmt: skip
            if write:
                self.last_write[ptr], self.reads[ptr] = (agent, position), {}
            else:
                self.reads.setdefault(ptr, {})[agent] = position
