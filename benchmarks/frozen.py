"""How right the frozen-picture flag is, on videos with motion of every kind and a freeze in the middle.

    .venv/bin/python benchmarks/frozen.py [--decode bgr|yuv420p|model] [--after-s 2] [--freeze-s 4]

Each video is made here from real pictures or ffmpeg/GStreamer test patterns (moving crops and pans of BCCD
images, sensor noise, a still background with a small moving object, testsrc2, the moving ball of the tests'
RTSP server, the three clips in ../shared/videos), with one picture repeated for --freeze-s in the middle:
the repeated frames go through libx264 like the rest, so that the decoder produces what a frozen source
behind an encoder produces (skipped blocks, and fresh compression noise at each keyframe); "+ noise" rows add
fresh sensor noise to every repeated frame too (a paused analog capture card). The video is then decoded by
streamd's own AVSource the way the daemon decodes it (--decode: full-size BGR for a recorded stream, the
model's size for a CPU stream that is not recorded, yuv420p planes for a device backend) and every frame goes
through FreezeDetector.update as in streamd.stages.decode.

Per video: the % of moving frames (all but the freeze and the time to clear it) flagged frozen; the time
from the freeze's first picture to the first flagged frame (target: at most --after-s + 0.5 s), and from
the first moving frame after it to the first frame not flagged (target: at most 0.5 s); the median ms of
one update() call at the size the detector saw; and last, update()'s cost on a 1920x1080 picture as BGR
and as a Y plane.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streamd.config import SourceKind  # noqa: E402
from streamd.ops.metrics import Metrics  # noqa: E402
from streamd.stages.decode import AVSource  # noqa: E402
from streamd.stages.freeze import FreezeDetector  # noqa: E402
from streamd.types import picture_hw  # noqa: E402

SHARED = ROOT.parent / "shared"
BCCD = SHARED / "datasets" / "BCCD" / "JPEGImages"
VIDEOS = SHARED / "videos"
MODEL_HW = (416, 416)  # the shipped bccd-nano bundle's input
SIZE = (640, 360)  # width, height of the made videos
MOVING_S = 3.0  # moving footage before and after the freeze


@dataclass(frozen=True, slots=True)
class Clip:
    """One benchmark video before encoding: BGR frames [H, W, 3], the picture repeated from `freeze_at`."""

    name: str
    frames: list[np.ndarray]
    fps: float
    freeze_at: int  # index of the picture that freezes (its repeats follow it)
    freeze_noise: float = 0.0  # sensor noise added to each repeated frame, grey levels (std)
    crf: int = 23


def bccd(index: int, size: tuple[int, int]) -> np.ndarray:
    """BCCD picture `index`, scaled to `size` (width, height), BGR uint8."""
    return cv2.resize(cv2.imread(str(BCCD / f"BloodImage_{index:05d}.jpg")), size, interpolation=cv2.INTER_AREA)


def pan(index: int, speed_px: float, fps: float, zoom_per_s: float = 0.0, noise: float = 0.0) -> list[np.ndarray]:
    """A SIZE window sliding `speed_px` per frame (sub-pixel) over a BCCD picture twice SIZE, bouncing at the
    edges, optionally zooming and with Gaussian sensor noise of std `noise` grey levels."""
    rng = np.random.default_rng(index)
    picture = bccd(index, (SIZE[0] * 2, SIZE[1] * 2))
    room_px = SIZE[0]  # how far the window can slide in x
    frames = []
    for n in range(int(2 * MOVING_S * fps)):
        x = speed_px * n % (2 * room_px)
        x = x if x <= room_px else 2 * room_px - x
        zoom = 1.0 + zoom_per_s * n / fps
        matrix = np.array([[zoom, 0, -x], [0, zoom, -SIZE[1] * 0.5 + 0.25 * x]], np.float32)
        frame = cv2.warpAffine(picture, matrix, SIZE, flags=cv2.INTER_LINEAR)
        frames.append(add_noise(frame, noise, rng))
    return frames


def small_object(index: int, speed_px: float, fps: float, radius_px: int = 8) -> list[np.ndarray]:
    """A still BCCD picture with one dark disk of `radius_px` crossing it at `speed_px` per frame."""
    background = bccd(index, SIZE)
    frames = []
    for n in range(int(2 * MOVING_S * fps)):
        frame = background.copy()
        x, y = 100 + speed_px * n, 150 + 0.5 * speed_px * n
        # shift=4: centre in 1/16 px, so that a slow disk moves by sub-pixel steps as a real one does
        cv2.circle(frame, (int(x * 16), int(y * 16)), radius_px * 16, (40, 30, 90), -1, cv2.LINE_AA, shift=4)
        frames.append(frame)
    return frames


def raw_frames(command: list[str], size: tuple[int, int], count: int) -> list[np.ndarray]:
    """`count` BGR frames of `size` read from a command that writes raw bgr24 to stdout."""
    data = subprocess.run(command, check=True, capture_output=True).stdout
    frames = np.frombuffer(data, np.uint8).reshape(-1, size[1], size[0], 3)[:count]
    return list(frames)


def testsrc2(fps: float) -> list[np.ndarray]:
    count = int(2 * MOVING_S * fps)
    command = ["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", f"testsrc2=size={SIZE[0]}x{SIZE[1]}:rate={fps}",
               "-frames:v", str(count), "-pix_fmt", "bgr24", "-f", "rawvideo", "-"]  # fmt: skip
    return raw_frames(command, SIZE, count)


def ball(fps: int) -> list[np.ndarray]:
    """GStreamer's videotestsrc moving ball, as tests/streamd/media.py's RTSP server sends it."""
    count = int(2 * MOVING_S * fps)
    command = ["gst-launch-1.0", "-q", "videotestsrc", "pattern=ball", f"num-buffers={count}", "!",
               f"video/x-raw,width={SIZE[0]},height={SIZE[1]},framerate={fps}/1", "!", "videoconvert", "!",
               "video/x-raw,format=BGR", "!", "fdsink", "fd=1"]  # fmt: skip
    return raw_frames(command, SIZE, count)


def real(name: str) -> tuple[list[np.ndarray], float]:
    """A clip of ../shared/videos decoded to BGR, played forth and back until it lasts 2 * MOVING_S."""
    with av.open(str(VIDEOS / name)) as container:
        fps = float(container.streams.video[0].average_rate)
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    played = list(frames)
    while len(played) < 2 * MOVING_S * fps:
        frames = frames[::-1]
        played += frames[1:]  # the turning frame once, not twice: a repeat would be a (tiny) freeze
    return played, fps


def add_noise(frame: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    if std == 0:
        return frame
    return np.clip(frame + rng.normal(0, std, frame.shape), 0, 255).astype(np.uint8)


def clips() -> Iterator[Clip]:
    """The benchmark's videos, each made when its turn comes (a few hundred MB of frames each)."""

    def middle(name: str, frames: list[np.ndarray], fps: float, **fields) -> Clip:
        return Clip(name, frames, fps, len(frames) // 2, **fields)

    yield middle("BCCD pan 0.25 px/frame", pan(0, 0.25, 30), 30)
    yield middle("BCCD pan 3 px/frame + zoom", pan(1, 3.0, 30, zoom_per_s=0.05), 30)
    yield middle("BCCD pan 0.5 px/frame, noise 4, crf 30", pan(2, 0.5, 30, noise=4.0), 30, crf=30)
    yield middle("BCCD pan 0.5 px/frame, noise 4 + noise 2", pan(3, 0.5, 30, noise=4.0), 30, freeze_noise=2.0)
    yield middle("BCCD pan 1 px/frame at 5 fps", pan(4, 1.0, 5), 5)
    yield middle("still BCCD, 8 px disk 1 px/frame", small_object(5, 1.0, 30), 30)
    yield middle("still BCCD, 8 px disk 0.2 px/frame", small_object(6, 0.2, 30), 30)
    yield middle("still BCCD, 4 px disk 1 px/frame", small_object(7, 1.0, 30, radius_px=4), 30)
    yield middle("testsrc2", testsrc2(30), 30)
    yield middle("ball (videotestsrc) 30 fps", ball(30), 30)
    yield middle("ball (videotestsrc) 60 fps", ball(60), 60)
    for name in ("car-detection.mp4", "asl-book.mkv", "asl-sister.mkv"):
        if (VIDEOS / name).exists():
            yield middle(name, *real(name))


def encode(clip: Clip, path: Path, freeze_s: float) -> tuple[int, int]:
    """Write `clip` with its picture repeated for freeze_s through libx264 (veryfast, keyframe every second,
    like a camera); returns the indices of the freeze's first picture and of the first moving frame after it."""
    rng = np.random.default_rng(0)
    repeats = round(freeze_s * clip.fps)
    still = clip.frames[clip.freeze_at]
    frames = clip.frames[: clip.freeze_at + 1]
    frames += [add_noise(still, clip.freeze_noise, rng) for _ in range(repeats)]
    frames += clip.frames[clip.freeze_at + 1 :]
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(clip.fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": str(clip.crf), "g": str(round(clip.fps))}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="bgr24")))
        container.mux(stream.encode())
    return clip.freeze_at, clip.freeze_at + repeats + 1


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    size: str  # the picture the detector saw, WxH
    moving_flagged_pct: float
    flag_s: float | None  # None: the freeze was never flagged
    clear_s: float | None  # None: still flagged at the end
    update_ms: float


def measure(clip: Clip, path: Path, decode: str, after_s: float, freeze_s: float) -> Row:
    first_still, first_moving = encode(clip, path, freeze_s)
    source = AVSource(
        clip.name, str(path), kind=SourceKind.FILE, metrics=Metrics([clip.name]),
        pixel_format="yuv420p" if decode == "yuv420p" else "bgr24", model_hw=MODEL_HW if decode == "model" else None,
    )  # fmt: skip
    detector = FreezeDetector(after_s)
    pts_s, flags, update_ms = [], [], []
    source.open()
    try:
        while (frame := source.read()) is not None:
            picture = frame.image[: picture_hw(frame.image, frame.layout.format)[0]]  # as stages/decode.py does
            started = time.perf_counter()
            flags.append(detector.update(picture, frame.pts_s))
            update_ms.append((time.perf_counter() - started) * 1e3)
            pts_s.append(frame.pts_s)
    finally:
        source.close()
    flagged = [n for n in range(first_still, first_moving) if flags[n]]
    cleared = [n for n in range(first_moving, len(flags)) if not flags[n]]
    # Moving frames: before the freeze, and after it from the first cleared frame (the time to clear is its own
    # column): a flag left on there is a false alarm.
    moving = flags[:first_still] + flags[cleared[0] if cleared else len(flags) :]
    return Row(
        clip.name, f"{picture.shape[1]}x{picture.shape[0]}", 100 * sum(moving) / len(moving),
        pts_s[flagged[0]] - pts_s[first_still] if flagged else None,
        pts_s[cleared[0]] - pts_s[first_moving] if cleared else None, float(np.median(update_ms)),
    )  # fmt: skip


def update_ms_1080p(planar: bool, frames: int = 200) -> float:
    """Median ms of one update() on a moving 1920x1080 BGR picture (or its Y plane)."""
    picture = bccd(8, (1920 * 2, 1080))
    detector = FreezeDetector(2.0)
    timings = []
    for n in range(frames):
        image = picture[:, n * 4 : n * 4 + 1920]
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if planar else np.ascontiguousarray(image)
        started = time.perf_counter()
        detector.update(image, n / 30)
        timings.append((time.perf_counter() - started) * 1e3)
    return float(np.median(timings))


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", choices=["bgr", "yuv420p", "model"], default="bgr")
    parser.add_argument("--after-s", type=float, default=2.0, help="frozen_after_s")
    parser.add_argument("--freeze-s", type=float, default=4.0, help="length of the freeze in the middle")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    print(f"decode {args.decode}, frozen_after_s {args.after_s:g}, freeze {args.freeze_s:g} s; CPU: {cpu}\n")
    print("| video | detector saw | moving frames flagged | flagged after (s) | cleared after (s) | ms/frame |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for n, clip in enumerate(clips()):
            row = measure(clip, Path(folder) / f"{n}.mp4", args.decode, args.after_s, args.freeze_s)
            print(f"| {row.name} | {row.size} | {row.moving_flagged_pct:.1f}% | {seconds(row.flag_s)} "
                  f"| {seconds(row.clear_s)} | {row.update_ms:.3f} |", flush=True)  # fmt: skip
    print(f"\nupdate() on 1920x1080: BGR {update_ms_1080p(False):.3f} ms, Y plane {update_ms_1080p(True):.3f} ms "
          "(median of 200 frames)")


if __name__ == "__main__":
    main()
