"""streamd.stages.freshness: a result older than its stream's budget at the send is dropped and counted as stale."""

from __future__ import annotations

import dataclasses
import time

import pytest

from streamd.ops.metrics import Metrics
from streamd.stages.freshness import FreshnessStage
from tests.streamd import media


@pytest.mark.parametrize(
    ("stream_id", "age_s", "passes"),
    [("cam", 0.05, True), ("cam", 0.5, False), ("file", 30.0, True)],
    ids=["fresh", "stale", "no budget"],
)
def test_stale_results_are_dropped_and_counted(stream_id: str, age_s: float, passes: bool) -> None:
    metrics = Metrics(["cam", "file"])
    stage = FreshnessStage({"cam": 150.0}, metrics)
    frame = next(media.synthetic_frames(1, stream_id=stream_id))
    result = media.frame_result(dataclasses.replace(frame, decoded_at=time.time() - age_s, decode_ms=1.0))
    assert list(stage.process(result)) == ([result] if passes else [])
    assert dict(metrics.summary("test").stream(stream_id).dropped_by_queue).get("stale", 0) == (0 if passes else 1)
