"""streamd.stages.decode: real files, a live UDP feed and an RTSP server on 127.0.0.1, decoded with PyAV."""

from __future__ import annotations

import random
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from streamd.backends.base import Picture
from streamd.config import StreamConfig
from streamd.errors import FatalError, SourceError
from streamd.ops.metrics import Metrics
from streamd.stages.decode import AVSource, TimeLine, open_source
from streamd.types import Frame
from tests.streamd import media

FPS = 25
FRAMES = 30
SIZE = (160, 120)  # width, height


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One FRAMES-frame clip per container (mpeg4 in AVI, H.264 elsewhere)."""
    folder = tmp_path_factory.mktemp("clips")
    codecs = {"mp4": "libx264", "mkv": "libx264", "ts": "libx264", "avi": "mpeg4"}
    return {
        suffix: media.make_video(folder / f"clip.{suffix}", size=SIZE, fps=FPS, frames=FRAMES, codec=codec, gop=10)
        for suffix, codec in codecs.items()
    }


def read_all(source: AVSource, limit: int = 1000) -> list[Frame]:
    frames = []
    while len(frames) < limit and (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def read_n(source: AVSource, count: int) -> list[Frame]:
    frames = [source.read() for _ in range(count)]
    assert all(frame is not None for frame in frames)
    return frames


def assert_well_formed(frames: list[Frame], stream_id: str, size: tuple[int, int], first_seq: int = 0) -> None:
    width, height = size
    assert [f.seq for f in frames] == list(range(first_seq, first_seq + len(frames)))
    pts = np.array([f.pts_s for f in frames])
    assert np.all(np.diff(pts) > 0), f"pts not strictly increasing: {pts}"
    for frame in frames:
        assert frame.stream_id == stream_id
        assert frame.image.shape == (height, width, 3) and frame.image.dtype == np.uint8
        assert not frame.image.flags.writeable
        assert frame.decode_ms >= 0 and abs(frame.decoded_at - time.time()) < 60


def stream(url: str, stream_id: str = "eus-1", *, validate: bool = True, **fields) -> StreamConfig:
    """A stream's config as `streamd validate` makes it (validate=False: a file that does not exist yet)."""
    if not validate:
        return StreamConfig.model_construct(id=stream_id, source=url, **fields)
    return StreamConfig.model_validate({"id": stream_id, "source": url, **fields})


def source_for(url: str, stream_id: str = "eus-1", *, validate: bool = True, **fields) -> tuple[AVSource, Metrics]:
    metrics = Metrics([stream_id])
    return open_source(stream(url, stream_id, validate=validate, **fields), metrics), metrics


@pytest.mark.parametrize(
    ("url", "fields", "live", "format", "options"),
    [
        ("{clip}", {}, False, None, {}),
        ("{clip}", {"realtime": True}, False, None, {}),
        ("rtsp://h/a", {}, True, None, {"rtsp_transport": "tcp", "timeout": "5000000"}),
        ("rtsp://h/a", {"rtsp_transport": "udp", "timeout_s": 2}, True, None,
         {"rtsp_transport": "udp", "timeout": "2000000"}),
        ("udp://@:5000", {}, True, None, {"timeout": "5000000", "overrun_nonfatal": "1", "analyzeduration": "300000"}),
        ("rtp://h:5004", {"timeout_s": 0.5}, True, None, {"timeout": "500000"}),
        ("/dev/video2", {"v4l2": {"video_size": "1280x720", "framerate": 30, "pixel_format": "mjpeg"}}, True, "v4l2",
         {"video_size": "1280x720", "framerate": "30", "input_format": "mjpeg"}),
    ],
)  # fmt: skip
def test_open_source_options(clips: dict[str, Path], url: str, fields: dict, live: bool, format: str | None, options: dict) -> None:
    source, _ = source_for(url.format(clip=clips["mp4"]), **fields)
    assert (source.live, source.format) == (live, format)
    assert options.items() <= source.options.items()


def test_extra_ffmpeg_options_come_last() -> None:
    source = open_source(stream("udp://@:5000"), Metrics(["eus-1"]), options={"fifo_size": "10"})
    assert source.options["fifo_size"] == "10"


@pytest.mark.parametrize("suffix", ["mp4", "mkv", "ts", "avi"])
def test_file_gives_every_frame_once(clips: dict[str, Path], suffix: str) -> None:
    source, _ = source_for(str(clips[suffix]), "file-1")
    source.open()
    try:
        frames = read_all(source)
        assert source.read() is None  # stays at the end
    finally:
        source.close()
    assert len(frames) == FRAMES and not source.live
    assert_well_formed(frames, "file-1", SIZE)
    assert frames[0].fps == pytest.approx(FPS)
    assert np.diff([f.pts_s for f in frames]) == pytest.approx(1 / FPS, abs=1e-3)
    assert not np.array_equal(frames[0].image, frames[1].image)  # the box moves


def test_loop_continues_seq_and_pts(clips: dict[str, Path]) -> None:
    source, metrics = source_for(str(clips["mp4"]), "loop-1", loop=True)
    source.open()
    try:
        frames = read_n(source, FRAMES * 2 + 5)
    finally:
        source.close()
    summary = metrics.summary("end").stream("loop-1")
    assert (summary.loops, summary.opens) == (2, 1)
    assert_well_formed(frames, "loop-1", SIZE)
    assert np.diff([f.pts_s for f in frames]) == pytest.approx(1 / FPS, abs=1e-3)  # no jump back, no gap
    np.testing.assert_array_equal(frames[0].image, frames[FRAMES].image)  # the second pass is the same video


def test_realtime_paces_at_the_file_rate(clips: dict[str, Path]) -> None:
    source, _ = source_for(str(clips["mkv"]), "rt-1", realtime=True)
    source.open()
    started = time.monotonic()
    try:
        frames = read_all(source)
    finally:
        source.close()
    elapsed_s = time.monotonic() - started
    content_s = frames[-1].pts_s - frames[0].pts_s  # 29 frame intervals = 1.16 s
    assert len(frames) == FRAMES
    assert elapsed_s >= 0.8 * content_s  # paced (a busy machine can only make it slower)


def test_corrupt_packets_are_skipped_and_counted(clips: dict[str, Path], tmp_path: Path) -> None:
    data = bytearray(clips["ts"].read_bytes())
    rng = random.Random(0)
    start = len(data) // 3 // 188 * 188
    for offset in range(start, start + 188 * 20, 3):  # 20 TS packets, sync bytes and continuity counters included
        data[offset] = rng.randrange(256)
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data))
    source, metrics = source_for(str(damaged), "bad-1")
    source.open()
    try:
        frames = read_all(source)
    finally:
        source.close()
    assert metrics.summary("end").stream("bad-1").corrupt_packets >= 1
    assert 0 < len(frames) <= FRAMES
    assert_well_formed(frames, "bad-1", SIZE)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("{tmp}/missing.mp4", FatalError),  # a file cannot come back: fatal, not retried
        ("{tmp}/not-a-video.mp4", FatalError),
        ("{tmp}/audio-only.mkv", FatalError),
        ("/dev/video99", SourceError),  # the V4L2 path, without a device
    ],
)
def test_open_failures_name_the_stream(tmp_path: Path, url: str, error: type[Exception]) -> None:
    (tmp_path / "not-a-video.mp4").write_text("hello")
    if "audio-only" in url:
        audio = ["-f", "lavfi", "-i", "sine=duration=0.2", str(tmp_path / "audio-only.mkv")]
        subprocess.run([media.FFMPEG, "-loglevel", "error", *audio], check=True, timeout=60)
    url = url.format(tmp=tmp_path)
    source, _ = source_for(url, "cam-9", validate=False)
    with pytest.raises(error, match=re.escape(f"stream 'cam-9' ({url})")):
        source.open()


def test_dead_udp_port_times_out() -> None:
    url = f"udp://127.0.0.1:{media.free_port()}"
    source, _ = source_for(url, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(SourceError, match=re.escape(f"stream 'eus-1' ({url}): no data for 1.0 s")):
        source.open()
    assert time.monotonic() - started < 30  # a hang guard only: the timeout is 1 s


def test_srt_fails_clearly() -> None:
    """PyAV's own FFmpeg may lack libsrt: either way a SourceError naming the stream, not a hang."""
    source, _ = source_for(f"srt://127.0.0.1:{media.free_port()}?mode=caller", "srt-1", timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(SourceError, match="stream 'srt-1'"):
        source.open()
    assert time.monotonic() - started < 30  # a hang guard only: the timeout is 1 s


@pytest.mark.slow
def test_an_outage_is_measured_from_the_last_frame_sent_even_when_the_reader_was_behind() -> None:
    """A busy reader (here: one that reads at half the feed's rate for 6 s) finds its frames waiting in the socket's
    buffer, so the last frame before an outage is read seconds after it came. The gap must still be the outage's
    length, from the last frame sent to the first after it (measured by when the frames were read, it came out short
    by the reader's lag: 1.4 s of 8 s on a loaded machine here, 5 s of 10 s in the field)."""
    port = media.free_port()
    source, _ = source_for(f"udp://127.0.0.1:{port}", timeout_s=2.0)
    sender = media.udp_sender(port)
    try:
        source.open()
        slow_until = time.monotonic() + 6.0
        while time.monotonic() < slow_until:  # 25 fps sent, 12.5 fps read: about 3 s behind at the end
            source.read()
            time.sleep(0.08)
        media.stop(sender)
        stopped = time.monotonic()
        with pytest.raises(SourceError, match="no data"):  # what was sent before the stop, then the timeout
            while True:
                source.read()
        time.sleep(max(0.0, stopped + 4.0 - time.monotonic()))  # the sender is away 4 s in all
        sender = media.udp_sender(port)
        back = time.monotonic()
        source.open()
        (first,) = read_n(source, 1)
        outage_s = back - stopped
        # at least the time the sender was away (the first frame after it may take a keyframe's wait longer)
        assert outage_s - 0.3 <= first.gap_s <= outage_s + 2.0, (first.gap_s, outage_s)
    finally:
        source.close()
        media.stop(sender)


@pytest.mark.slow
def test_live_udp_mpegts_and_reconnect() -> None:
    port = media.free_port()
    url = f"udp://127.0.0.1:{port}"
    source, metrics = source_for(url, timeout_s=3.0)
    sender = media.udp_sender(port)
    try:
        source.open()
        frames = read_n(source, 15)
        assert source.live
        assert_well_formed(frames, "eus-1", (320, 240))
        assert frames[0].fps == pytest.approx(25)

        media.stop(sender)  # the feed dies: a SourceError within the read timeout, not a hang
        started = time.monotonic()
        with pytest.raises(SourceError, match="no data for 3.0 s"):
            read_n(source, 1000)
        assert time.monotonic() - started < 30  # a hang guard only: the read timeout is 3 s

        sender = media.udp_sender(port)  # the runner reopens: seq and pts go on
        source.open()
        more = read_n(source, 5)
        assert metrics.summary("running").stream("eus-1").opens == 2
        assert more[0].seq > frames[-1].seq and more[0].pts_s > frames[-1].pts_s
        # the outage is this frame's gap, and the time line goes on after it (by the wall clock)
        # (counted from the last frame delivered, which the UDP buffer held a while after the sender stopped)
        assert more[0].gap_s > 0.5 and more[0].pts_s > frames[-1].pts_s + more[0].gap_s - 0.5
        assert all(f.gap_s == 0 for f in more[1:]) and all(f.pts_jump_s == 0 for f in [*frames, *more])
        assert_well_formed(more, "eus-1", (320, 240), first_seq=more[0].seq)
    finally:
        source.close()
        media.stop(sender)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_from_a_real_server(transport: str) -> None:
    if reason := media.rtsp_available():
        pytest.skip(reason)
    port = media.free_port("tcp")
    server = media.rtsp_server(port, size=(320, 240), fps=25)
    url = f"rtsp://127.0.0.1:{port}/test"
    source, _ = source_for(url, "rtsp-1", rtsp_transport=transport, timeout_s=5.0)
    try:
        source.open()
        frames = read_n(source, 10)
        assert source.live
        assert_well_formed(frames, "rtsp-1", (320, 240))
        media.stop(server)  # the server goes away: the stream ends or times out, as a SourceError
        with pytest.raises(SourceError, match=re.escape(f"stream 'rtsp-1' ({url})")):
            read_n(source, 1000)
    finally:
        source.close()
        media.stop(server)


# (source pts, packet arrival (monotonic), gap) per frame -> (pts, jump) per frame; 10 fps
_TIMELINES = {
    "steady file": (False, [(0.0, 0, 0), (0.1, 0, 0), (0.2, 0, 0)], [(0.0, 0), (0.1, 0), (0.2, 0)]),
    "missing pts": (False, [(0.0, 0, 0), (None, 0, 0), (0.2, 0, 0)], [(0.0, 0), (0.1, 0), (0.2, 0)]),
    # a corrupted timestamp: +11,884 s, then the source goes on from there; removed, flagged once
    "corrupt jump": (False, [(0.0, 0, 0), (0.1, 0, 0), (11884.2, 0, 0), (11884.3, 0, 0)],
                     [(0.0, 0), (0.1, 0), (0.2, 11884.0), (0.3, 0)]),
    "live corrupt jump": (True, [(1.0, 10.0, 0), (1.1, 10.1, 0), (11885.2, 10.2, 0), (11885.3, 10.3, 0)],
                          [(1.0, 0), (1.1, 0), (1.2, 11884.0), (1.3, 0)]),
    # live: the consumer was late and read buffered frames 3 s after they came: no jump
    "late consumer": (True, [(1.0, 10.0, 0), (1.1, 13.0, 0), (1.2, 13.0, 0)], [(1.0, 0), (1.1, 0), (1.2, 0)]),
    "reset backwards": (False, [(5.0, 0, 0), (5.1, 0, 0), (0.0, 0, 0), (0.1, 0, 0)],
                        [(5.0, 0), (5.1, 0), (5.2, -5.2), (5.3, 0)]),
    # live: a packet 3 s later whose pts is 3 s later is no jump (the source really paused)
    "live pause": (True, [(1.0, 10.0, 0), (1.1, 10.1, 0), (4.1, 13.1, 0)], [(1.0, 0), (1.1, 0), (4.1, 0)]),
    # live: a reopen after a 7 s outage restarts the source clock at 0: the time line goes on after the gap
    "reopen": (True, [(1.0, 10.0, 0), (1.1, 10.1, 0), (0.0, 17.1, 7.0), (0.1, 17.2, 0)],
               [(1.0, 0), (1.1, 0), (8.1, 0), (8.2, 0)]),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_TIMELINES))
def test_timeline_table(name: str) -> None:
    paced, frames, expected = _TIMELINES[name]
    timeline = TimeLine(paced=paced)
    placed = [timeline.place(pts, received, gap, 0.1) for pts, received, gap in frames]
    assert [(round(p, 6), round(j, 6)) for p, j in placed] == [(pytest.approx(p), pytest.approx(j)) for p, j in expected]


def test_a_looping_file_restarts_without_a_jump() -> None:
    timeline = TimeLine(paced=False)
    placed = [timeline.place(pts, 0, 0, 0.1) for pts in (0.0, 0.1)]
    timeline.restart()
    placed += [timeline.place(pts, 0, 0, 0.1) for pts in (0.0, 0.1)]
    assert placed == [(0.0, 0), (0.1, 0), (pytest.approx(0.2), 0), (pytest.approx(0.3), 0)]


def test_a_frozen_live_feed_is_flagged_for_real(tmp_path: Path) -> None:
    """A still picture sent live over UDP (a frozen capture card): frames keep coming, flagged frozen."""
    still = tmp_path / "still.png"
    import cv2

    cv2.imwrite(str(still), np.full((120, 160, 3), 90, np.uint8))
    port = media.free_port()
    sender = subprocess.Popen(
        [media.FFMPEG, "-loglevel", "error", "-re", "-loop", "1", "-i", str(still), "-r", "25", "-c:v", "libx264",
         "-preset", "ultrafast", "-tune", "zerolatency", "-g", "10", "-pix_fmt", "yuv420p", "-f", "mpegts",
         f"udp://127.0.0.1:{port}?pkt_size=1316"],
    )  # fmt: skip
    source, _ = source_for(f"udp://127.0.0.1:{port}", timeout_s=5.0, frozen_after_s=0.4)
    try:
        source.open()
        frames = read_n(source, 25)
    finally:
        source.close()
        media.stop(sender)
    assert not frames[0].frozen and frames[-1].frozen


BCCD = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "BCCD"
SHIPPED = Path(__file__).resolve().parents[3] / "models" / "bccd-nano.bundle"


@pytest.fixture(scope="module")
def bccd_video(tmp_path_factory) -> Path:
    """6 BCCD test images as a 1280x720 H.264 clip, 2 frames each: real cells, upscaled like a 720p feed."""
    if not (BCCD / "JPEGImages").is_dir():
        pytest.skip("the BCCD dataset is not beside the checkout")
    folder = tmp_path_factory.mktemp("bccd")
    ids = (BCCD / "ImageSets" / "Main" / "test.txt").read_text().split()[:6]
    listing = folder / "frames.txt"
    listing.write_text("".join(f"file '{BCCD / 'JPEGImages' / (i + '.jpg')}'\nduration 0.08\n" for i in ids))
    video = folder / "bccd-720p.mp4"
    subprocess.run(
        [media.FFMPEG, "-loglevel", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing), "-vf",
         "fps=25,scale=1280:720,format=yuv420p", "-c:v", "libx264", "-crf", "18", str(video)],
        check=True, timeout=60,
    )  # fmt: skip
    return video


def test_a_stream_decoded_for_the_model_is_never_made_full_size_and_detects_the_same(bccd_video: Path) -> None:
    """Not recorded: swscale converts and scales each frame to the letterbox's size in one pass; the boxes still
    come back in source pixels and match the full-frame path: every box scoring 0.5 or more is found again at
    IoU >= 0.95 with its score within 0.03 (swscale's area resampling is within ~1 grey level of OpenCV's
    bilinear, so a box near the threshold can move a little: measured, min IoU 0.954 above 0.5)."""
    from streamd.backends.onnxruntime import OnnxRuntimeBackend
    from streamd.model import load_bundle
    from streamd.detector import Detector
    from streamd.model.postprocess import box_iou

    bundle = load_bundle(SHIPPED)
    detector = Detector.for_bundle(bundle, OnnxRuntimeBackend(bundle, max_batch=4, intra_op_threads=1))
    runs = {}
    for name, model_hw in (("full", None), ("scaled", tuple(bundle.meta.input_hw))):
        source = open_source(stream(str(bccd_video)), Metrics(["eus-1"]), model_hw=model_hw)
        source.open()
        try:
            frames = read_all(source)
        finally:
            source.close()
        runs[name] = frames
    full, scaled = runs["full"], runs["scaled"]
    assert len(full) == len(scaled) >= 10
    assert scaled[0].image.shape == (234, 416, 3) and (scaled[0].width, scaled[0].height) == (1280, 720)  # 416/1280
    assert full[0].image.shape == (720, 1280, 3) and scaled[0].scale == pytest.approx(0.325)
    matched = 0
    for a, b in zip(full, scaled):
        (da,) = detector.detect([a.image], conf_threshold=0.3, iou_threshold=0.45)
        (db,) = detector.submit(detector.batch([Picture(b.image, prescale=b.scale, source_hw=(b.height, b.width))], 0.3, 0.45)).wait().detections
        for box, score, cls in zip(da.xyxy, da.confidence, da.class_id):
            same_class = db.class_id == cls
            candidates = list(zip(box_iou(box, db.xyxy[same_class]).tolist(), np.abs(score - db.confidence[same_class]).tolist()))
            if score >= 0.5:  # a box well above the threshold must be found again, in source pixels
                best_iou, score_diff = max(candidates, default=(0.0, 1.0))
                assert best_iou >= 0.95 and score_diff <= 0.03, (box, score, candidates)
                matched += 1
    assert matched >= 20  # real cells were found and compared

