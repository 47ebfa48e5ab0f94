"""streamd.backends.cuda_slots on the recording runtime (fake_gpu.py): the order of work on the streams, the slots'
reuse, the device guard in the calling thread, errors; the same code the torch and TensorRT backends run on CUDA."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamd.backends import cuda_slots
from streamd.backends.cuda_slots import CudaRuntime, CudaSlots
from streamd.errors import BackendError
from streamd.model.bundle import Preprocess
from streamd.types import BGR24, PixelLayout

from tests.streamd.backends import fake_gpu
from tests.streamd.backends.fake_gpu import CALLS, GUARDS, RecordingRuntime, current_stream, note
from tests.streamd.backends.sim_cuda import SimRuntime

CHW, ROWS = (3, 4, 4), (2, 7)  # a 4x4 model input; 2 anchors, 2 classes


def upload(slot: int) -> list:
    return [("upload", "h2d", slot), ("upload", "record uploaded", slot)]


def compute(slot: int, *copies: str) -> list:
    return [("compute", "wait uploaded", slot), ("compute", "model", None), *[("compute", c, slot) for c in copies],
            ("compute", "record done", slot)]  # fmt: skip


def boxes(images: torch.Tensor) -> torch.Tensor:
    """Anchor 0 of each image: a box (1, 1, 3, 3) in input pixels, of class 1, its score the image's mean."""
    rows = torch.zeros((images.shape[0], *ROWS), device=images.device)
    rows[:, 0, :6] = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 0.0], device=images.device)
    rows[:, 0, 6] = images.mean(dim=(1, 2, 3))
    return rows


def one_box_per_frame(images: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """A model that returns its output (as the torch model does), for the slot to copy into its own."""
    note(current_stream(), "model")
    return boxes(images)


def in_place(images: torch.Tensor, output: torch.Tensor) -> None:
    """A model that writes the slot's output itself (as a TensorRT engine does, at the address it was given)."""
    note(current_stream(), "model")
    output.copy_(boxes(images))


@pytest.fixture
def slots(recording_cuda) -> CudaSlots:
    return CudaSlots(RecordingRuntime("cuda:1", "test"), "backend test", 3, CHW, torch.float32, ROWS, torch.float32)


def batch(count: int, value: float) -> np.ndarray:
    return np.full((count, *CHW), value, np.float32)


def test_batches_upload_then_compute_and_a_reused_slot_waits_for_its_batch(slots):
    first, second = slots.submit_tensor(batch(2, 1.0), one_box_per_frame), slots.submit_tensor(batch(1, 2.0), one_box_per_frame)
    assert CALLS == upload(0) + compute(0, "output", "d2h") + upload(1) + compute(1, "output", "d2h")
    CALLS.clear()
    third = slots.submit_tensor(batch(2, 3.0), one_box_per_frame)  # slot 0 again: the first batch is collected first
    assert CALLS == [("host", "wait done", 0)] + upload(0) + compute(0, "output", "d2h")
    CALLS.clear()
    outputs = [pending.wait() for pending in (first, second, third)]
    assert CALLS == [("host", "wait done", 1), ("host", "wait done", 0)]  # the first was already collected
    assert [o[:, 0, 6].tolist() for o in outputs] == [[1.0, 1.0], [2.0], [3.0, 3.0]]  # the first survived its slot's reuse
    assert all(o.dtype == np.float32 and o.shape[1:] == ROWS for o in outputs)
    assert slots.in_flight == [None, None]


def test_a_model_that_writes_the_slot_output_itself_is_not_copied(slots):
    output = slots.submit_tensor(batch(1, 5.0), in_place).wait()
    assert CALLS == upload(0) + compute(0, "d2h") + [("host", "wait done", 0)]
    assert output[0, 0, 6] == 5.0


def test_frames_are_letterboxed_on_the_upload_stream_and_only_boxes_come_back(slots, monkeypatch):
    monkeypatch.setattr(cuda_slots, "letterbox_frames", fake_gpu.recorded(cuda_slots.letterbox_frames, "letterbox"))
    images = [np.full((8, 8, 3), 100, np.uint8), np.full((4, 6, 3), 50, np.uint8), np.full((12, 8), 128, np.uint8)]
    pending = slots.submit(fake_gpu.frame_batch(images, [BGR24, BGR24, PixelLayout("yuv420p")], [0.5, 1.0, 1.0], [(16, 16), (4, 6), (8, 8)], 0.3, 0.45), (4, 4), Preprocess(), one_box_per_frame)  # fmt: skip
    assert CALLS == [("upload", "h2d", 0), ("upload", "letterbox", None), ("upload", "record uploaded", 0)] + compute(0, "output")
    first, second, third = pending.wait().detections
    assert CALLS[-1] == ("host", "wait done", 0)
    # (1, 1, 3, 3) in input pixels; letterbox scale 0.5 and prescale 0.5: x4 in source pixels
    np.testing.assert_allclose(first.xyxy, [[4, 4, 12, 12]])
    assert first.class_id.tolist() == [1] and first.confidence == pytest.approx([100.0])
    # 4x6 at scale 4/6: (1.5, 1.5, 4.5, 4.5), clipped to the 6x4 source
    np.testing.assert_allclose(second.xyxy, [[1.5, 1.5, 4.5, 4]])
    # 8x8 yuv420p planes, converted on the device: Y 128 with neutral chroma is grey 130 (BT.601 limited range)
    np.testing.assert_allclose(third.xyxy, [[2, 2, 6, 6]])
    assert third.confidence == pytest.approx([130.0], abs=1.0)
    assert slots.host_frames[0].numel() == 8 * 8 * 3 + 4 * 6 * 3 + 12 * 8  # grown to fit the batch of frames


def test_submit_and_wait_enter_the_device_guard_in_their_own_thread(slots):
    GUARDS.clear()
    results = {}

    def worker() -> None:
        results["output"] = slots.submit_tensor(batch(1, 1.0), one_box_per_frame).wait()

    thread = threading.Thread(target=worker, name="inference")
    thread.start()
    thread.join(timeout=30)
    assert "output" in results  # every recorded call checked it ran under a guard of its own thread
    assert GUARDS and set(GUARDS) == {("inference", "cuda:1")}


def test_the_recording_runtime_refuses_calls_outside_the_device_guard(slots):
    with pytest.raises(AssertionError, match="outside the device guard"):
        slots.runtime.record(slots.done[0], slots.compute_stream)


def test_close_after_a_failed_submit_waits_for_both_streams(slots):
    def refuses(images, output):
        raise BackendError("backend test: the engine refused the batch")

    with pytest.raises(BackendError, match="refused"):
        slots.submit_tensor(batch(2, 1.0), refuses)
    assert CALLS == upload(0) + [("compute", "wait uploaded", 0)]  # the upload is queued, with no Pending to wait on
    CALLS.clear()
    slots.close()
    assert CALLS == [("host", "synchronize upload", None), ("host", "synchronize compute", None)]


def test_a_cuda_error_is_a_backend_error_naming_the_device_and_batch(slots):
    def fails(images, output):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(BackendError, match=r"backend test: CUDA error on cpu on a batch of 2: CUDA error: an illegal"):
        slots.submit_tensor(batch(2, 1.0), fails)


def test_a_batch_that_fails_in_wait_fails_there_once_and_frees_its_slot(slots, monkeypatch):
    """An error while collecting a batch (an out-of-memory in NMS, say) is that batch's: its wait() raises it (again
    if asked again), and the next submit on its slot runs instead of re-running the failed one."""
    failing = slots.submit(fake_gpu.frame_batch([np.full((4, 4, 3), 9, np.uint8)], [BGR24], [1.0], [(4, 4)], 0.3, 0.45), (4, 4), Preprocess(), one_box_per_frame)  # fmt: skip

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    real = cuda_slots.postprocess_on_device
    monkeypatch.setattr(cuda_slots, "postprocess_on_device", out_of_memory)
    for _ in range(2):
        with pytest.raises(BackendError, match="CUDA out of memory"):
            failing.wait()
    assert slots.in_flight == [None, None]
    monkeypatch.setattr(cuda_slots, "postprocess_on_device", real)
    slots.submit_tensor(batch(1, 1.0), one_box_per_frame)  # slot 1
    CALLS.clear()
    third = slots.submit_tensor(batch(1, 4.0), one_box_per_frame)  # slot 0: nothing left to collect there
    assert CALLS == upload(0) + compute(0, "output", "d2h") and third.wait()[0, 0, 6] == 4.0


class Takes:
    """What FrameBatch.check asks of a backend."""

    name, max_batch, pixel_formats = "test", 4, frozenset({"bgr24"})


@pytest.mark.parametrize(
    "count, layout, error",
    [
        (1, BGR24, None),
        (4, BGR24, None),
        (0, BGR24, r"backend test: batch of 0 frames, it takes 1..4"),
        (5, BGR24, r"backend test: batch of 5 frames, it takes 1..4"),
        (2, PixelLayout("yuv420p"), r"backend test: takes \['bgr24'\] images only, got \['yuv420p'\]"),
    ],
)
def test_a_frame_batch_a_backend_cannot_take_is_refused(count, layout, error):
    batch = fake_gpu.frame_batch([np.zeros((6, 2), np.uint8)] * count, [layout] * count, [1.0] * count, [(4, 2)] * count, 0.3, 0.45)
    if error is None:
        batch.check(Takes())
    else:
        with pytest.raises(BackendError, match=error):
            batch.check(Takes())


def test_cuda_runtime_events_block(monkeypatch):
    """A non-blocking event's synchronize() spins a core the decoders need."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 80GB")
    monkeypatch.setattr(torch.cuda, "Event", lambda **options: options)
    runtime = CudaRuntime(torch.device("cuda:1"), "backend test")
    assert runtime.gpu_name == "Fake GPU 80GB" and runtime.event("done", 0) == {"blocking": True}
    with pytest.raises(BackendError, match=r"backend test: device cuda:2, but this machine has 2 CUDA device\(s\)"):
        CudaRuntime(torch.device("cuda:2"), "backend test")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_runtime_without_a_gpu_is_a_backend_error():
    with pytest.raises(BackendError, match="backend test: device cuda:0, but no CUDA GPU is available"):
        CudaRuntime(torch.device("cuda:0"), "backend test")


def test_the_next_submit_on_a_failed_batchs_slot_runs_and_the_error_stays_the_batchs(slots, monkeypatch):
    """take() collects the failed batch without raising its error: that is its own wait()'s."""
    monkeypatch.setattr(cuda_slots, "postprocess_on_device", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")))
    failing = slots.submit(fake_gpu.frame_batch([np.full((4, 4, 3), 9, np.uint8)], [BGR24], [1.0], [(4, 4)], 0.3, 0.45), (4, 4), Preprocess(), one_box_per_frame)  # fmt: skip
    slots.submit_tensor(batch(1, 1.0), one_box_per_frame)  # slot 1
    assert slots.submit_tensor(batch(1, 4.0), one_box_per_frame).wait()[0, 0, 6] == 4.0  # slot 0: collects the failed one
    with pytest.raises(BackendError, match="CUDA out of memory"):
        failing.wait()


# --- on the simulated GPU (sim_cuda.py): streams that run later, in their own threads ----------------------------


def sim_model(images: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return boxes(images)


class GatedRuntime(SimRuntime):
    """wait() in the thread named "results" holds until the test opens the gate (or 3 s pass): the daemon's results
    thread, waiting on a batch while the submit thread goes on."""

    def __init__(self, device, label: str):
        super().__init__(device, label)
        self.gate = threading.Event()

    def wait(self, event) -> None:
        if threading.current_thread().name == "results":
            self.gate.wait(timeout=3)
        super().wait(event)


def test_a_batch_being_collected_keeps_its_slot_until_finished():
    """The race of issue 15: batch 1 is collected in the results thread while the submit thread submits batch 3 on
    batch 1's slot. Batch 3 must wait for batch 1's finish(): batch 1's result is batch 1's."""
    runtime = GatedRuntime("cuda:0", "test")
    slots = CudaSlots(runtime, "backend test", 3, CHW, torch.float32, ROWS, torch.float32)
    first, _ = slots.submit_tensor(batch(1, 1.0), sim_model), slots.submit_tensor(batch(1, 2.0), sim_model)
    collected = {}
    results = threading.Thread(target=lambda: collected.update(first=first.wait()), name="results")
    results.start()
    while not runtime.gate.is_set() and results.is_alive() and slots.in_flight[0] is first and first._finish is not None:
        if first._lock.locked():  # the results thread is inside wait()
            break
        threading.Event().wait(0.001)
    slots.submit_tensor(batch(1, 3.0), sim_model)  # slot 0 again
    runtime.synchronize(slots.compute_stream)  # batch 3 is all done on the GPU before batch 1's result is read
    runtime.gate.set()
    results.join(timeout=60)
    assert collected["first"][0, 0, 6] == 1.0
    assert runtime.races == [] and [f for stream in runtime.streams.values() for f in stream.failures] == []


@pytest.mark.parametrize("seed", [0, 1])
def test_batches_in_flight_from_a_submit_and_a_results_thread_on_the_simulated_gpu(seed):
    """Twelve batches, submitted by one thread and collected by another as the daemon does:
    each result is its own batch's, and no two accesses to a buffer were unordered."""
    runtime = SimRuntime("cuda:0", "test", seed=seed)
    slots = CudaSlots(runtime, "backend test", 3, CHW, torch.float32, ROWS, torch.float32)
    handed: list = []
    ready = threading.Semaphore(0)
    collected = []

    def collect() -> None:
        for _ in range(12):
            ready.acquire()
            kind, value, pending = handed.pop(0)
            result = pending.wait()
            collected.append((value, result[0, 0, 6]))

    results = threading.Thread(target=collect, name="results")
    results.start()
    for index in range(12):
        value = float(index + 1)
        handed.append(("batch", value, slots.submit_tensor(batch(index % 3 + 1, value), sim_model)))
        ready.release()
    results.join(timeout=120)
    assert [value for value, _ in collected] == [float(i + 1) for i in range(12)]
    assert [float(found) for _, found in collected] == pytest.approx([value for value, _ in collected])
    assert runtime.races == [] and [f for stream in runtime.streams.values() for f in stream.failures] == []


def test_the_simulated_gpu_refuses_a_pageable_buffer_in_a_non_blocking_copy():
    runtime = SimRuntime("cuda:0", "test")
    slots = CudaSlots(runtime, "backend test", 3, CHW, torch.float32, ROWS, torch.float32)
    with runtime.guard(), pytest.raises(AssertionError, match="pageable source"):
        runtime.copy(slots.staged[0], torch.zeros(slots.staged[0].shape), slots.upload_stream, "h2d", 0)
