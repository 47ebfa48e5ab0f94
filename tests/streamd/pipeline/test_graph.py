"""streamd.pipeline.graph and compose: wiring errors raise at build time; compose builds the diagram's queues."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from streamd.config import load_config
from streamd.model.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.pipeline.compose import Switches, compose
from streamd.pipeline.graph import Graph, Queue
from streamd.pipeline.queues import Batcher
from tests.streamd.pipeline.fakes import CollectStage, FakeBackend, FakeSource, build


def test_wiring_errors_raise_at_build_time(tiny_bundle):
    shared = CollectStage("shared")
    with pytest.raises(ValueError, match="wired twice"):
        build(tiny_bundle, [FakeSource("a"), FakeSource("b")], outputs=lambda sid: [shared])
    with pytest.raises(ValueError, match="unique"):
        build(tiny_bundle, [FakeSource("a"), FakeSource("a")])
    with pytest.raises(TypeError, match="not a Stage"):
        build(tiny_bundle, [FakeSource("a")], outputs=lambda sid: [object()])
    with pytest.raises(ValueError, match="policy"):
        build(tiny_bundle, [FakeSource("a")], policy="newest")


@pytest.mark.parametrize(
    "wire, error",
    [
        (lambda g, s, b, st: g.add_flow(s, st), "needs a Queue"),
        (lambda g, s, b, st: g.add_flow(st, b, Queue("input", 2, "block")), "only sources flow into the batcher"),
        (lambda g, s, b, st: (g.add_flow(s, b, Queue("input", 2, "block")), g.add_flow(b, st, Queue("x", 1, "block"))),
         "takes no Queue"),
        (lambda g, s, b, st: (g.add_flow(s, b, Queue("input", 2, "block")), g.add_flow(b, st),
                              g.add_flow(st, CollectStage("x"), stream="other"), g.check()), "no source feeds"),
    ],
)  # fmt: skip
def test_more_wiring_errors(wire, error):
    graph = Graph(Metrics(["a"]))
    with pytest.raises(ValueError, match=error):
        wire(graph, FakeSource("a"), Batcher(2, 0), CollectStage("stage"))


def test_a_stage_of_one_stream_cannot_feed_another_stream():
    graph = Graph(Metrics(["a", "b"]))
    shared, first, second = CollectStage("shared"), CollectStage("first"), CollectStage("second")
    graph.add_flow(FakeSource("a"), batch := Batcher(2, 0), Queue("input", 2, "block"))
    graph.add_flow(batch, shared)
    graph.add_flow(shared, first, Queue("output", 2, "block"), stream="a")
    with pytest.raises(ValueError, match="cannot feed stream 'b'"):
        graph.add_flow(first, second, stream="b")


def test_compose_shows_every_stage_queue_and_policy(tiny_bundle, clip, tmp_path: Path):
    config_path = tmp_path / "streamd.yaml"
    config_path.write_text(textwrap.dedent(f"""
        model: {tiny_bundle.path}
        streams:
          - id: file
            source: {clip}
            record: {{dir: rec}}
            detection_log: {{dir: log}}
          - id: cam
            source: udp://127.0.0.1:5000
            queue: {{size: 3}}
          - id: paced                  # a realtime file keeps the file's clock like a camera: live policy
            source: {clip}
            realtime: true
            queue: {{size: 2}}
        publish: {{bind: "tcp://127.0.0.1:5555"}}
    """))
    config = load_config(config_path)
    metrics = Metrics(["file", "cam", "paced"])
    detector = Detector.for_bundle(tiny_bundle, FakeBackend())
    graph = compose(config, detector, metrics, zmq_context=object(), switches=Switches())
    workers = {w.name: ([n.name for n in w.nodes()], w.inbox) for w in graph.workers()}
    assert {name: nodes for name, (nodes, _) in workers.items()} == {
        "batch": ["submit"],
        "in_flight": ["results"],
        "output:file": ["annotate:file", "record:file", "detection_log:file"],
        "publish": ["freshness", "publish"],  # a stale result is dropped right before the socket
    }
    queues = {q.name: (q.maxsize, q.policy) for _, (_, q) in workers.items() if q is not graph.batcher.obj}
    inputs = {q.name: (q.maxsize, q.policy) for _, q in graph.sources}
    assert inputs == {"input:file": (8, "block"), "input:cam": (3, "drop_oldest"), "input:paced": (2, "drop_oldest")}
    assert queues == {"in_flight": (1, "block"), "output:file": (8, "block"), "publish": (13, "drop_oldest")}
    (fresh,) = [n.obj for n in graph.workers()[-1].nodes() if n.obj.name == "freshness"]
    assert fresh.max_age_ms == {"cam": 150, "paced": 150}  # paced streams have a stale budget, files none
    # credits: the file stream's results need a place in its block output queue; the live camera's need none
    assert [q.name for q in graph.batcher.obj._credited["file"]] == ["output:file"]
    assert graph.batcher.obj._credited["cam"] == []
    off = compose(config, detector, Metrics(["file", "cam", "paced"]), None, Switches(record=False, detection_log=False, publish=False))
    assert [w.name for w in off.workers()] == ["batch", "in_flight"]
