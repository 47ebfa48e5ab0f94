"""trainer.predict on images, folders and videos with a fake detector, through streamd's own stages."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from streamd.backends.base import FunctionBackend
import jsonschema

from streamd.messages import schema
from streamd.model.postprocess import yolox_anchors
from tests.streamd import media
from trainer.detect import Detector
from trainer.predict import IMAGES_LOG, predict

CLASSES = ("lesion", "landmark")
INPUT_HW = (64, 64)
FPS = 5
NUM_FRAMES = 7


def one_box(batch: np.ndarray) -> np.ndarray:
    """A fake model: one "landmark" at (12, 12)-(28, 28) of the letterboxed input in every image.

    float32 [N, A, 5 + C] with A the anchors of a YOLOX head at 64x64: row 0 is the box, the rest empty.
    """
    output = np.zeros((len(batch), yolox_anchors(INPUT_HW), 5 + len(CLASSES)), np.float32)
    output[:, 0, :5] = (20, 20, 16, 16, 0.9)
    output[:, 0, 6] = 1.0
    return output


DETECTOR = Detector(FunctionBackend(one_box, INPUT_HW), INPUT_HW, CLASSES, name="fake", sha256="cd" * 32)


def ffmpeg_video(path: Path, size: str, codec: str) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size={size}:rate={FPS}",
         "-frames:v", str(NUM_FRAMES), "-c:v", codec, "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """media/ with images of three formats (one nested), two videos, and files predict must skip."""
    root = tmp_path_factory.mktemp("media")
    image = np.full((48, 64, 3), 90, np.uint8)
    cv2.imwrite(str(root / "a.jpg"), image)
    cv2.imwrite(str(root / "b.PNG"), image)
    (root / "nested").mkdir()
    cv2.imwrite(str(root / "nested" / "c.bmp"), image)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not media")  # not an image or video suffix: never picked up from a folder
    ffmpeg_video(root / "clip.mp4", "64x48", "libx264")
    ffmpeg_video(root / "nested" / "odd.mkv", "65x49", "ffv1")  # odd size: the H.264 copy loses a row and a column
    (root / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    return root


def video_info(path: Path) -> tuple[int, str, int, int]:
    """(frame count, frame rate, width, height) of a video, by ffprobe or else PyAV."""
    if shutil.which("ffprobe"):
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
             "stream=nb_read_frames,r_frame_rate,width,height,codec_name", "-of", "json", str(path)],
            check=True, capture_output=True, text=True,
        )
        stream = json.loads(probe.stdout)["streams"][0]
        assert stream["codec_name"] == "h264"
        return int(stream["nb_read_frames"]), stream["r_frame_rate"], stream["width"], stream["height"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        count = sum(1 for _ in container.decode(stream))
        return count, str(stream.average_rate), stream.width, stream.height


@pytest.mark.parametrize(
    ("names", "images", "videos", "failed", "outputs"),
    [
        (["a.jpg"], 1, 0, [], ["a.jpg"]),
        (["b.PNG", "nested/c.bmp"], 2, 0, [], ["b.PNG", "c.bmp"]),
        (["clip.mp4"], 0, 1, [], ["clip.mp4"]),
        (["broken.jpg", "bad.mp4", "notes.txt", "a.jpg"], 1, 0, ["broken.jpg", "bad.mp4", "notes.txt"], ["a.jpg"]),
        (
            ["."],
            3,
            2,
            ["broken.jpg", "bad.mp4"],
            ["media0/a.jpg", "media0/b.PNG", "media0/nested/c.bmp", "media0/clip.mp4", "media0/nested/odd.mp4"],
        ),
    ],
    ids=["image", "images", "video", "unreadable", "folder"],
)
def test_predict(tmp_path: Path, inputs: Path, names: list[str], images: int, videos: int, failed: list[str],
                 outputs: list[str]) -> None:
    out_dir = tmp_path / "out"
    result = predict(DETECTOR, [inputs / name for name in names], out_dir, conf_threshold=0.3, iou_threshold=0.45)
    frames = NUM_FRAMES * videos
    assert (result.num_images, result.num_videos, result.num_frames) == (images, videos, frames)
    assert result.num_detections == images + frames  # one box per image and frame
    assert sorted(message.split(": ")[0] for message in result.failed) == sorted(str(inputs / name) for name in failed)
    written = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    logs = [str(Path(o).with_suffix(".jsonl")) for o in outputs if o.endswith(".mp4")] + ([IMAGES_LOG] if images else [])
    assert written == sorted([*outputs, *logs])
    assert sorted(result.logs) == sorted(str(out_dir / log) for log in logs)
    validator = jsonschema.Draft202012Validator(schema())
    for output in outputs:
        path = out_dir / output
        if path.suffix == ".mp4":
            count, rate, width, height = video_info(path)
            assert (count, rate) == (NUM_FRAMES, f"{FPS}/1")
            assert (width, height) == (64, 48)
            logged = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
            messages = [m for m in logged if m["schema"] == "streamd.detections/3"]  # and its track events
            assert {m["schema"] for m in logged} <= {"streamd.detections/3", "streamd.track/1"}
            assert [m["seq"] for m in messages] == list(range(NUM_FRAMES))  # the daemon's detection log
            assert [m["pts"] for m in messages] == pytest.approx([i / FPS for i in range(NUM_FRAMES)])
        else:
            annotated = cv2.imread(str(path))
            assert annotated is not None and annotated.shape == (48, 64, 3)
            assert (annotated != 90).any()  # the box was drawn
            (messages,) = [[json.loads(line) for line in (out_dir / IMAGES_LOG).read_text().splitlines()
                            if json.loads(line)["stream"] == output]]  # fmt: skip
        for message in messages:
            validator.validate(message)
            (found,) = message["detections"]  # a video's boxes are tracked, an image's not
            assert (found["label"], found["class_id"], found["score"]) == ("landmark", 1, 0.9)


def test_images_keep_their_boxes_in_source_pixels(tmp_path: Path, inputs: Path) -> None:
    # 64x48 letterboxed into 64x64 at scale 1: the box comes back unchanged.
    predict(DETECTOR, [inputs / "a.jpg"], tmp_path, conf_threshold=0.3, iou_threshold=0.45)
    (message,) = [json.loads(line) for line in (tmp_path / IMAGES_LOG).read_text().splitlines()]
    assert (message["stream"], message["seq"], message["frame"]) == ("a.jpg", 0, {"width": 64, "height": 48})
    assert message["model"] == {"name": "fake", "sha256": "cd" * 32}
    assert message["detections"] == [{"label": "landmark", "class_id": 1, "score": 0.9, "box": [12.0, 12.0, 28.0, 28.0],
                                      "track_id": None, "confirmed": True}]  # a still image is not tracked


def test_output_folder_inside_the_input_folder_is_not_read_back(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((32, 32, 3), np.uint8))
    for _ in range(2):
        result = predict(DETECTOR, [tmp_path], tmp_path / "predictions", conf_threshold=0.3, iou_threshold=0.45)
        assert result.num_images == 1


@pytest.mark.parametrize(
    ("names", "outputs"),
    [
        (["x/a.png", "y/a.png"], ["a.png", "a_1.png"]),  # two files of one name
        (["x", "y"], ["x/a.png", "y/a.png"]),  # two folders keep their names
    ],
)
def test_output_names_never_collide(tmp_path: Path, names: list[str], outputs: list[str]) -> None:
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        cv2.imwrite(str(tmp_path / folder / "a.png"), np.zeros((32, 32, 3), np.uint8))
    out_dir = tmp_path / "out"
    predict(DETECTOR, [tmp_path / name for name in names], out_dir, conf_threshold=0.3, iou_threshold=0.45)
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png")) == outputs


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jpg: no such file or folder"):
        predict(DETECTOR, [tmp_path / "nope.jpg"], tmp_path / "out", conf_threshold=0.3, iou_threshold=0.45)


def test_a_video_that_fails_part_way_keeps_the_frames_before_it(tmp_path: Path) -> None:
    """A real corrupt MPEG-TS on which PyAV raises part-way: the frames before it are annotated and logged,
    the recording is closed properly, and the failure is reported with the file."""
    corrupt = media.corrupt_ts(tmp_path)
    result = predict(DETECTOR, [corrupt], tmp_path / "out", conf_threshold=0.3, iou_threshold=0.45)
    (failure,) = result.failed
    assert failure.startswith(f"{corrupt}: failed after {result.num_frames} frames") and "IndexError" in failure
    assert result.num_videos == 1 and 0 < result.num_frames < 100
    count, _, _, _ = video_info(tmp_path / "out" / "corrupt.mp4")  # playable, with every frame before the failure
    logged = [json.loads(line) for line in (tmp_path / "out" / "corrupt.jsonl").read_text().splitlines()]
    assert count == result.num_frames == sum(m["schema"] == "streamd.detections/3" for m in logged)
