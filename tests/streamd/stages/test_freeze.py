"""streamd.stages.freeze: moving footage is never frozen, a freeze is, in time; on frames decoded from H.264."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from streamd.stages.freeze import FreezeDetector
from tests.streamd import media

BCCD = Path(__file__).resolve().parents[4] / "shared" / "datasets" / "BCCD" / "JPEGImages"
SIZE = (320, 180)  # width, height
FPS = 30


def bccd_picture(size: tuple[int, int]) -> np.ndarray:
    """A real BCCD picture scaled to `size` (width, height), or a textured stand-in where the data set is absent."""
    path = BCCD / "BloodImage_00003.jpg"
    if path.exists():
        return cv2.resize(cv2.imread(str(path)), size, interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(3)
    return cv2.GaussianBlur(rng.integers(0, 256, (size[1], size[0], 3), np.uint8), (9, 9), 3)


def pan(count: int, speed_px: float) -> list[np.ndarray]:
    """A SIZE window sliding `speed_px` per frame (sub-pixel) over a picture twice as large."""
    picture = bccd_picture((SIZE[0] * 2, SIZE[1] * 2))
    shifts = [np.float32([[1, 0, -speed_px * n], [0, 1, -SIZE[1] / 2]]) for n in range(count)]
    return [cv2.warpAffine(picture, shift, SIZE) for shift in shifts]


def disk(count: int, speed_px: float, radius_px: int = 4) -> list[np.ndarray]:
    """A still picture with one small dark disk crossing it at `speed_px` per frame."""
    background, frames = bccd_picture(SIZE), []
    for n in range(count):
        frame = background.copy()
        centre = (int((40 + speed_px * n) * 16), int((60 + 0.5 * speed_px * n) * 16))  # 1/16 px, shift=4
        cv2.circle(frame, centre, radius_px * 16, (40, 30, 90), -1, cv2.LINE_AA, shift=4)
        frames.append(frame)
    return frames


def decoded(tmp_path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """`images` through libx264 (a keyframe every second, like a camera) and back: the luma planes a live
    decoder hands the detector."""
    path = media.encode_images(tmp_path / "clip.mp4", images, fps=FPS, options={"preset": "veryfast", "g": str(FPS)})
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]


def flags_of(detector: FreezeDetector, images: list[np.ndarray], fps: float = FPS) -> list[bool]:
    return [detector.update(image, n / fps) for n, image in enumerate(images)]


@pytest.mark.parametrize(
    "images",
    [
        pytest.param(lambda: pan(120, 0.25), id="slow pan 0.25 px/frame"),
        pytest.param(lambda: pan(120, 3.0), id="pan 3 px/frame"),
        pytest.param(lambda: disk(120, 1.0), id="4 px disk on a still picture"),
        pytest.param(lambda: disk(120, 0.25, radius_px=6), id="slow 6 px disk on a still picture"),
    ],
)
def test_moving_footage_is_never_frozen(tmp_path: Path, images) -> None:
    """4 s of decoded video that moves (however little, or wherever) with frozen_after_s 1: no frame flagged."""
    assert not any(flags_of(FreezeDetector(after_s=1.0), decoded(tmp_path, images())))


def test_testsrc2_with_its_moving_box_is_never_frozen(tmp_path: Path) -> None:
    path = media.make_video(tmp_path / "testsrc2.mp4", size=SIZE, fps=FPS, frames=90, gop=FPS)
    with av.open(str(path)) as container:
        images = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    assert not any(flags_of(FreezeDetector(after_s=1.0), images))


def with_noise(image: np.ndarray, std: float, seed: int) -> np.ndarray:
    return np.clip(image + np.random.default_rng(seed).normal(0, std, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("encoded", "noise"),
    [
        pytest.param(False, 0.0, id="bit-identical frames"),
        pytest.param(True, 0.0, id="frames the decoder repeats"),
        pytest.param(True, 2.0, id="a paused capture card: re-encoded, fresh noise"),
    ],
)
def test_a_freeze_is_flagged_in_time_and_cleared_in_time(tmp_path: Path, encoded: bool, noise: float) -> None:
    """2 s of pan, 3 s of one picture, 2 s of pan; frozen_after_s 1: flagged 1-1.5 s into the freeze, not
    before, and cleared within 0.5 s of the pan's return."""
    moving = pan(120, 2.0)
    still = [with_noise(moving[60], noise, seed) for seed in range(3 * FPS)]
    images = moving[:61] + still + moving[61:]
    images = decoded(tmp_path, images) if encoded else images
    flags = flags_of(FreezeDetector(after_s=1.0), images)
    first_still, first_moving = 60, 61 + len(still)
    flagged_s = (flags.index(True) - first_still) / FPS
    cleared_s = (flags.index(False, first_moving) - first_moving) / FPS
    assert not any(flags[:first_still])
    assert 1.0 <= flagged_s <= 1.5 and all(flags[first_still + round(flagged_s * FPS) : first_moving])
    assert cleared_s <= 0.5 and not any(flags[first_moving + round(cleared_s * FPS) :])


@pytest.mark.parametrize(
    ("side_px", "level", "moves"),
    [
        (16, 160, True),  # a small object, 60 grey levels off the background, crossing a still 1080p scene: motion
        (16, 160, False),  # the same object standing still: a freeze
        (12, 255, True),
    ],
)
def test_a_small_object_in_a_still_1080p_scene_is_motion(side_px: int, level: int, moves: bool) -> None:
    still = np.full((1080, 1920), 100, np.uint8)
    images = []
    for n in range(3 * FPS):
        image = still.copy()
        x = 900 + (2 * n if moves else 0)
        image[500 : 500 + side_px, x : x + side_px] = level
        images.append(image)
    assert any(flags_of(FreezeDetector(after_s=2.0), images)) is not moves


@pytest.mark.parametrize("fps", [5, 30, 60])
def test_a_freeze_is_timed_by_the_streams_clock_whatever_its_rate(fps: int) -> None:
    """frozen_after_s is seconds of the stream's time: 2 s is 10 frames at 5 fps, 120 at 60 fps."""
    still = np.full((90, 160), 80, np.uint8)
    flags = flags_of(FreezeDetector(after_s=2.0), [still] * (3 * fps), fps)
    assert flags.index(True) == 2 * fps


def test_a_new_picture_size_starts_afresh() -> None:
    """A source reopened at another size is a new picture, not a frozen one."""
    detector = FreezeDetector(after_s=0.1)
    assert flags_of(detector, [np.zeros((90, 160), np.uint8)] * 3 + [np.zeros((180, 320), np.uint8)], fps=10) == [
        False, False, True, False,
    ]  # fmt: skip
