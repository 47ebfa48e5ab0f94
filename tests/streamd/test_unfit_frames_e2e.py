"""`streamd run` with a stream whose frames no stage can take (1920x4: a 0-pixel letterbox side) beside a
healthy one: that stream's frames are skipped with one warning, the healthy stream completes, the exit code
is a stream error's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.streamd import media
from tests.streamd.test_pipeline_e2e import jsonl, streamd

pytestmark = pytest.mark.slow


def test_a_1920x4_stream_is_its_own_error_and_the_healthy_stream_completes(tmp_path: Path, tiny_bundle, clip):
    thin = media.make_video(tmp_path / "thin.mp4", size=(1920, 4), frames=12)
    config = media.write_config(
        tmp_path,
        f"""
        model: {tiny_bundle.path}
        backend: {{type: onnxruntime, threads: 1}}
        streams:
          - id: thin
            source: {thin}
            detection_log: {{dir: log}}
          - id: thin-recorded
            source: {thin}
            record: {{dir: rec, preset: ultrafast}}
          - id: good
            source: {clip}
            record: {{dir: rec, preset: ultrafast}}
            detection_log: {{dir: log}}
        """,
    )
    daemon = streamd("run", str(config))
    out, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 1, err  # streams failed, the others ran on: as for any stream error
    assert "Traceback" not in err and "inv_scale" not in err
    for sid in ("thin", "thin-recorded"):  # one warning per stream and size, not one per frame
        warnings = [line for line in err.splitlines() if f"stream {sid!r}: skipping the frames" in line]
        assert len(warnings) == 1 and "a 1920x4 image cannot be letterboxed" in warnings[0], err
    (last,) = [line for line in err.splitlines() if line.startswith("streamd: ")]
    assert "the others ran on" in last and "12 frames: a 1920x4 image" in last
    logs = jsonl(list((tmp_path / "log").glob("*.jsonl")))
    assert [m["seq"] for m in logs if m["stream"] == "good"] == list(range(40))
    assert not [m for m in logs if m["stream"] != "good"]
    (recording,) = (tmp_path / "rec").glob("good_*.mp4")
    assert media.probe_frame_count(recording) == 40
    assert not list((tmp_path / "rec").glob("thin-recorded_*"))
