"""trainer.device.pick_device: train.device to a torch device."""

from __future__ import annotations

import pytest
import torch

from trainer.device import pick_device

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize(
    ("setting", "local_rank", "expected"),
    [
        ("cpu", None, torch.device("cpu")),
        ("auto", None, torch.device("cuda", 0) if CUDA else torch.device("cpu")),
        pytest.param("cuda", "1", torch.device("cuda", 1), id="cuda-under-torchrun",
                     marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]),
        ("cuda", None, RuntimeError("no CUDA device is available") if not CUDA else torch.device("cuda", 0)),
    ],
)
def test_pick_device(monkeypatch, setting: str, local_rank: str | None, expected) -> None:
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    if isinstance(expected, Exception):
        with pytest.raises(type(expected), match=str(expected)):
            pick_device(setting)
    else:
        assert pick_device(setting) == expected
