"""streamd.model.bundle against hostile bundle.json text: each bad field is one BundleError naming bundle.json and
the field (issue 16 items 7 and 8), never a traceback or a silent acceptance."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from streamd.backends.onnxruntime import OnnxRuntimeBackend
from streamd.errors import BundleError
from streamd.model import load_bundle, write_bundle
from tests.streamd.conftest import bundle_meta, tiny_onnx_bytes


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "tiny.bundle", tiny_onnx_bytes(), bundle_meta()).path


def edit_text(bundle: Path, old: str, new: str) -> None:
    path = bundle / "bundle.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def set_field(bundle: Path, dotted: str, value) -> None:
    path = bundle / "bundle.json"
    raw = json.loads(path.read_text())
    *parents, last = dotted.split(".")
    target = raw
    for key in parents:
        target = target[key]
    target[last] = value
    path.write_text(json.dumps(raw))


TEXT_EDITS = [
    # (what, old text, new text, the message's field and reason)
    ("duplicate key", '"name": "tiny-test",', '"name": "tiny-test", "name": "other",', r"field 'name' appears twice"),
    ("duplicate nested key", '"opset": 17,', '"opset": 17, "opset": 18,', r"field 'opset' appears twice"),
    ("5000-digit integer", '"opset": 17', '"opset": ' + "9" * 5000, r"onnx\.opset: an integer of 5000 digits is out of range"),
    ("5000-digit metric", '"metrics": {}', '"metrics": {"val_ap": -' + "1" * 5000 + "}", r"metrics\.val_ap: an integer of 5000 digits"),
    ("NaN threshold", '"conf_threshold": 0.3', '"conf_threshold": NaN', r"thresholds\.conf_threshold: .*finite"),
    ("Infinity scale", '"scale": 1.0', '"scale": Infinity', r"preprocess\.scale: .*finite"),
]  # fmt: skip

FIELD_VALUES = [
    ("preprocess.scale", 1e30, r"preprocess\.scale: Input should be less than or equal to 255"),
    ("preprocess.mean", [0, 0, 1e9], r"preprocess\.mean: .*within 0\.\.255"),
    ("preprocess.std", [1, 1, 0], r"preprocess\.std: .*within 1e-3\.\.255"),
    ("class_names", ["a", "b", "a"], r"class_names: .*distinct; repeated: 'a'"),
    ("class_names", ["a", "b\x1b[31m", "c"], r"class_names: .*class_names\[1\] must be printable"),
    ("class_names", ["a", "", "c"], r"class_names: .*class_names\[1\] must be printable"),
    ("class_names", ["a", " b", "c"], r"class_names\[1\] .*surrounding spaces"),
    ("onnx.file", "../elsewhere.onnx", r"onnx\.file: .*inside the bundle folder"),
    ("onnx.file", "/etc/hostname", r"onnx\.file: .*inside the bundle folder"),
    ("onnx.file", "golden/../../x.onnx", r"onnx\.file: .*inside the bundle folder"),
    ("onnx.output_name", "out\nput", r"onnx\.output_name: .*printable"),
    ("onnx.opset", 10**6, r"onnx\.opset: Input should be less than or equal to 64"),
    ("input_hw", [65536, 65536], r"input_hw: .*from 32 to 4096"),
]  # fmt: skip


@pytest.mark.parametrize("what, old, new, message", TEXT_EDITS, ids=[row[0] for row in TEXT_EDITS])
def test_bad_json_text_is_one_bundle_error_naming_the_field(bundle, what, old, new, message):
    edit_text(bundle, old, new)
    with pytest.raises(BundleError, match=r"tiny\.bundle/bundle\.json: .*" + message):
        load_bundle(bundle)


@pytest.mark.parametrize("field, value, message", FIELD_VALUES, ids=[f"{r[0]}={str(r[1])[:12]!r}" for r in FIELD_VALUES])
def test_bad_field_value_is_one_bundle_error_naming_the_field(bundle, field, value, message):
    set_field(bundle, field, value)
    with pytest.raises(BundleError, match=r"tiny\.bundle/bundle\.json: .*" + message):
        load_bundle(bundle)


def test_a_link_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle / "model.onnx").read_bytes())
    os.symlink(outside, bundle / "linked.onnx")
    set_field(bundle, "onnx.file", "linked.onnx")
    with pytest.raises(BundleError, match=r"bundle\.json: onnx\.file: linked\.onnx leads outside the bundle folder"):
        load_bundle(bundle)


@pytest.mark.parametrize("field, value", [("onnx.output_name", "logits"), ("onnx.input_name", "pixels")])
def test_io_names_that_the_model_does_not_have_are_refused_when_it_loads(bundle, field, value):
    set_field(bundle, field, value)
    loaded = load_bundle(bundle)  # bundle.json alone cannot know; the runtime that reads the graph checks
    with pytest.raises(BundleError, match=rf"bundle\.json: {field.replace('.', '[.]')} is '{value}' but model\.onnx has"):
        OnnxRuntimeBackend(loaded, max_batch=1)


def test_the_tiny_bundle_itself_loads(bundle):
    meta = load_bundle(bundle).meta
    assert meta.format_version == 2 and meta.golden is None
