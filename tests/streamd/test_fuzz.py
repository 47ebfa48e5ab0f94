"""Property-based fuzz of what a user hands streamd: mutated daemon configs and bundle.json files.

Whatever the mutation, loading either succeeds or raises the project's own
error (ConfigError, BundleError) whose every line names the file: never a
traceback from pydantic, PyYAML, json or the file system.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.config import load_config
from streamd.errors import BundleError, ConfigError
from streamd.model import load_bundle

CONFIG = textwrap.dedent("""
    model: {bundle}
    backend: {{type: onnxruntime, threads: 1}}
    batch: {{max_batch: 4, max_wait_ms: 5}}
    thresholds: {{conf_threshold: 0.3}}
    streams:
      - id: room-1
        source: {clip}
        segment_s: 60
        record: {{dir: rec, codec: libx264, crf: 23}}
        detection_log: {{dir: log}}
      - id: room-2
        source: udp://127.0.0.1:5000
        queue: {{size: 2, policy: drop_oldest}}
        reconnect: {{initial_s: 0.5, max_s: 10}}
    publish: {{bind: "tcp://127.0.0.1:5555", sndhwm: 100}}
""").lstrip()

# Characters that break YAML and JSON in interesting ways, and values of the wrong type.
NOISE = st.sampled_from(["", ":", "- ", "{", "}", "[", "]", "&a", "*a", "!!python/object", "\t", "#", "'", '"', "\\",
                         "\x00", "\xff", "\udcff", "true", "null", "-1", "1e999", "nan", ".inf", "99999", "é", "\n", " " * 3,
                         "a" * 300, "<<: *a"])  # fmt: skip


def mutate(text: str, data: st.DataObject) -> str:
    """A few random edits of `text`: insert noise, delete a span, or duplicate a line."""
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        match data.draw(st.sampled_from(["insert", "delete", "duplicate"])):
            case "insert":
                text = text[:at] + data.draw(NOISE) + text[at:]
            case "delete":
                text = text[:at] + text[at + data.draw(st.integers(1, 20)):]
            case "duplicate":
                lines = text.splitlines(keepends=True)
                if lines:
                    index = data.draw(st.integers(0, len(lines) - 1))
                    lines.insert(index, lines[index])
                    text = "".join(lines)
    return text


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_mutated_config_loads_or_is_refused_naming_the_file(tmp_path_factory, tiny_bundle, clip, data):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "streamd.yaml"
    text = mutate(CONFIG.format(bundle=tiny_bundle.path, clip=clip), data)
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    try:
        load_config(path)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines and all(line.startswith(str(path)) for line in lines), str(exc)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_mutated_bundle_json_loads_or_is_refused_naming_the_file(tmp_path_factory, tiny_bundle, data):
    folder = tmp_path_factory.mktemp("fuzz") / "tiny.bundle"
    shutil.copytree(tiny_bundle.path, folder)
    meta = folder / "bundle.json"
    text = mutate(json.dumps(json.loads(meta.read_text()), indent=1), data)
    meta.write_bytes(text.encode("utf-8", errors="surrogateescape"))
    try:
        load_bundle(folder)
    except BundleError as exc:
        assert str(Path(folder)) in str(exc), str(exc)
