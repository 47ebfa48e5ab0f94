"""streamd.model.bundle provenance: format 3's source_bundle and calibration fields, and older bundles still loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamd.errors import BundleError
from streamd.model import load_bundle, write_bundle
from streamd.model.bundle import describe_provenance
from tests.streamd.conftest import bundle_meta, tiny_onnx_bytes

QUANTIZED = {
    "source_bundle": {"name": "bccd-nano.bundle", "sha256": "a" * 64},
    "calibration": {
        "experiment": "configs/bccd.yaml", "dataset": "BCCD", "split": "train", "images": 64,
        "fingerprint": "b" * 64, "method": "minmax", "target": "tensorrt",
    },
}  # fmt: skip


def quantized_meta() -> dict:
    meta = bundle_meta("tiny-int8")
    meta["provenance"] = {**meta["provenance"], **json.loads(json.dumps(QUANTIZED))}
    return meta


def rewrite(bundle: Path, change) -> Path:
    raw = json.loads((bundle / "bundle.json").read_text())
    change(raw)
    (bundle / "bundle.json").write_text(json.dumps(raw))
    return bundle


def test_a_quantized_bundle_is_format_3_and_an_fp32_one_stays_format_2(tmp_path):
    int8 = write_bundle(tmp_path / "int8.bundle", tiny_onnx_bytes(), quantized_meta())
    assert int8.meta.format_version == 3
    assert load_bundle(int8.path).meta.provenance.calibration.target == "tensorrt"
    assert write_bundle(tmp_path / "fp32.bundle", tiny_onnx_bytes(), bundle_meta()).meta.format_version == 2
    lines = describe_provenance(int8.meta)
    assert "int8 of bccd-nano.bundle (onnx sha256 aaaaaaaaaaaa...), for tensorrt" in lines
    assert any("calibrated (minmax) on 64 images of BCCD/train from configs/bccd.yaml" in line for line in lines)


def test_an_fp32_bundle_has_no_format_3_keys_for_a_format_2_reader_to_refuse(tmp_path):
    """Format 2's reader refuses keys it does not know, null or not: the new ones are left out, not written null."""
    bundle = write_bundle(tmp_path / "fp32.bundle", tiny_onnx_bytes(), bundle_meta())
    provenance = json.loads((bundle.path / "bundle.json").read_text())["provenance"]
    assert "source_bundle" not in provenance and "calibration" not in provenance
    int8 = json.loads((write_bundle(tmp_path / "int8.bundle", tiny_onnx_bytes(), quantized_meta()).path / "bundle.json").read_text())
    assert int8["provenance"]["calibration"]["images"] == 64


@pytest.mark.parametrize("format_version", [1, 2])
def test_format_1_and_2_bundles_still_load(tmp_path, format_version):
    bundle = write_bundle(tmp_path / "old.bundle", tiny_onnx_bytes(), bundle_meta())
    rewrite(bundle.path, lambda raw: raw.update(format_version=format_version))
    meta = load_bundle(bundle.path).meta
    assert meta.format_version == format_version and meta.provenance.source_bundle is None
    assert describe_provenance(meta) == ["trained on handmade for 0 epochs (trainer tests, 2026-01-01T00:00:00Z)"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["calibration"].update(images=0), "provenance.calibration.images: Input should be greater than or equal to 1"),
        (lambda p: p["calibration"].update(target="openvino"), "provenance.calibration.target: Input should be 'onnxruntime' or 'tensorrt'"),
        (lambda p: p["calibration"].pop("fingerprint"), "provenance.calibration.fingerprint: Field required"),
        (lambda p: p["source_bundle"].update(sha256="xyz"), "provenance.source_bundle.sha256: String should match pattern"),
        (lambda p: p["calibration"].update(images_seen=3), "provenance.calibration.images_seen: Extra inputs are not permitted"),
        (lambda p: p.pop("source_bundle"), "provenance: Value error, source_bundle and calibration come together"),
        (lambda p: p.update(source_bundle="bccd-nano.bundle"), "provenance.source_bundle: Input should be a valid dictionary"),
    ],
)
def test_a_malformed_provenance_field_names_bundle_json_and_the_field(tmp_path, change, message):
    bundle = write_bundle(tmp_path / "int8.bundle", tiny_onnx_bytes(), quantized_meta())
    rewrite(bundle.path, lambda raw: change(raw["provenance"]))
    with pytest.raises(BundleError, match=rf"int8.bundle/bundle.json: .*{message}"):
        load_bundle(bundle.path)


def test_the_new_fields_need_format_3(tmp_path):
    bundle = write_bundle(tmp_path / "int8.bundle", tiny_onnx_bytes(), quantized_meta())
    rewrite(bundle.path, lambda raw: raw.update(format_version=2))
    with pytest.raises(BundleError, match=r"bundle.json: .*provenance.source_bundle and provenance.calibration need format_version 3"):
        load_bundle(bundle.path)
