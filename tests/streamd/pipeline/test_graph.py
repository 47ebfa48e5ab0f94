"""streamd.pipeline.graph and compose: wiring errors raise at build time; compose builds the diagram's queues."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from streamd.config import load_config
from streamd.detector import Detector
from streamd.ops.metrics import Metrics
from streamd.pipeline.compose import Switches, compose
from streamd.pipeline.endpoints import endpoints
from streamd.pipeline.graph import Graph, Queue
from streamd.pipeline.queues import Batcher
from tests.streamd.pipeline.fakes import CollectStage, FakeBackend, FakeSource, build


def test_wiring_errors_raise_at_build_time(tiny_bundle):
    shared = CollectStage("shared")
    with pytest.raises(ValueError, match="is stream 'a''s but a flow from message:b makes it stream 'b''s"):
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


def test_fan_in_into_one_queue_and_explicit_scopes():
    """Stages of two streams feed one queue whose reader is shared; a stage called by a stream's stage is that
    stream's; one stage cannot be both."""
    graph = Graph(Metrics(["a", "b"]))
    batch, results, sink, after = Batcher(2, 0), CollectStage("results"), CollectStage("sink"), CollectStage("after")
    fan_in = Queue("publish", 4, "block")
    own = {}
    for sid in ("a", "b"):
        graph.add_flow(FakeSource(sid), batch, Queue("input", 2, "block"))
        own[sid] = CollectStage("own")
        graph.add_flow(results, own[sid], stream=sid)
        graph.add_flow(own[sid], sink, fan_in)
    graph.add_flow(batch, results)
    graph.add_flow(sink, after)
    graph.check()
    workers = {w.name: w for w in graph.workers()}
    assert set(workers) == {"batch", "publish"}
    (sink_node, after_node) = workers["publish"].nodes()
    assert (sink_node.stream, after_node.stream, sink_node.streams) == (None, None, {"a", "b"})
    assert [n.stream for n in workers["batch"].nodes()] == [None, "a", "b"]
    assert workers["publish"].streams == {"a", "b"}  # it ends after both streams' ends
    with pytest.raises(ValueError, match="is shared but a flow from own:a makes it stream 'a''s"):
        graph2 = Graph(Metrics(["a"]))
        graph2.add_flow(FakeSource("a"), b2 := Batcher(2, 0), Queue("input", 2, "block"))
        graph2.add_flow(b2, r2 := CollectStage("results"))
        graph2.add_flow(r2, o2 := CollectStage("own"), stream="a")
        graph2.add_flow(o2, s2 := CollectStage("sink"), q2 := Queue("publish", 2, "block"))
        graph2.add_flow(o2, s2, q2, stream="a")


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
        publish: {{bind: "tcp://127.0.0.1:5555"}}
    """))
    config = load_config(config_path)
    metrics = Metrics(["file", "cam", "paced"])
    detector = Detector.for_bundle(tiny_bundle, FakeBackend())
    graph = compose(config, detector, metrics, endpoints(config, detector, metrics, object(), Switches()))
    workers = {w.name: ([n.name for n in w.nodes()], w.inbox) for w in graph.workers()}
    assert {name: nodes for name, (nodes, _) in workers.items()} == {
        "batch": ["submit"],
        # each stream's own stages run in the results thread, called for that stream's results only
        "in_flight": ["results", "track:file", "message:file", "track:cam", "message:cam", "track:paced", "message:paced"],
        "output:file": ["annotate:file", "record:file", "detection_log:file"],
        "publish": ["freshness", "publish"],  # every stream's messages and the heartbeat; stale ones dropped here
    }
    node = {n.name: n for w in graph.workers() for n in w.nodes()}
    assert [n.stream for n in (node["track:cam"], node["message:cam"], node["results"], node["publish"])] == [
        "cam", "cam", None, None]  # a stage of one stream, or shared: stated by the flows, never inferred
    assert [t.name for t, _ in graph.tickers] == ["ticker:heartbeat"]
    queues = {q.name: (q.maxsize, q.policy) for _, (_, q) in workers.items() if q is not graph.batcher.obj}
    inputs = {q.name: (q.maxsize, q.policy) for _, q in graph.sources}
    # a paced stream's input queue holds its newest frame by default (what waits for inference stays fresh); a size
    # set is kept; the publisher's queue has room for the streams' queues and a whole batch (max_batch 8)
    assert inputs == {"input:file": (8, "block"), "input:cam": (3, "drop_oldest"), "input:paced": (1, "drop_oldest")}
    assert queues == {"in_flight": (1, "block"), "output:file": (8, "block"), "publish": (27, "drop_oldest")}
    (fresh,) = [n.obj for n in graph.workers()[-1].nodes() if n.obj.name == "freshness"]
    assert fresh.max_age_ms == {"cam": 150, "paced": 150}  # paced streams have a stale budget, files none
    # credits: the file stream's results need a place in its block output queue; the live camera's need none
    assert [q.name for q in graph.batcher.obj._credited["file"]] == ["output:file"]
    assert graph.batcher.obj._credited["cam"] == []
    metrics = Metrics(["file", "cam", "paced"])
    off = compose(config, detector, metrics, endpoints(config, detector, metrics, None, Switches(False, False, False)))
    assert [w.name for w in off.workers()] == ["batch", "in_flight"]
