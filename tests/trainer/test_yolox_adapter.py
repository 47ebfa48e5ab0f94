"""trainer.yolox_adapter: Megvii checkpoints for fine-tuning."""

from __future__ import annotations

import pytest
import torch

from trainer.yolox_adapter import build_model, load_pretrained


def test_pretrained_checkpoint_with_other_class_count(tmp_path):
    """A Megvii-format {"model": state_dict} with 80 classes fine-tunes a 2-class model."""
    source = build_model("yolox_nano", 80)
    torch.save({"model": source.state_dict()}, tmp_path / "yolox_nano.pth")
    target = build_model("yolox_nano", 2)
    skipped = load_pretrained(target, tmp_path / "yolox_nano.pth")
    assert skipped and all(".cls_preds." in name for name in skipped)
    loaded = target.state_dict()
    stem = "backbone.backbone.stem.conv.conv.weight"
    assert torch.equal(loaded[stem], source.state_dict()[stem])


def test_pretrained_file_that_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": {}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a YOLOX checkpoint"):
        load_pretrained(build_model("yolox_nano", 2), tmp_path / "bad.pth")
