"""trainer.checkpoint: the typed Checkpoint, its on-disk dict (weights_only), the RNG state and the readers' errors."""

from __future__ import annotations

import logging
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import Checkpoint, RngState, read_checkpoint, resolve_checkpoint, save_checkpoint
from trainer.config import Experiment
from trainer.yolox_adapter import build_model

CLASSES = ("red", "green")


def trained_experiment(tmp_path: Path) -> dict:
    return Experiment.model_validate(
        {"name": "tiny", "classes": list(CLASSES), "dataset": {"name": "d", "format": "voc", "root": str(tmp_path)},
         "model": {"input_hw": [64, 64]}}
    ).model_dump(mode="json")


def checkpoint(tmp_path: Path, **changes) -> Checkpoint:
    """A checkpoint as `trainer train` builds it after epoch 3, from a real model, optimizer and scaler."""
    model = build_model("yolox_nano", len(CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # momentum buffers: an optimizer state with tensors
    fields = dict(
        model=model.state_dict(), raw_model=model.state_dict(), optimizer=optimizer.state_dict(),
        scaler=torch.amp.GradScaler("cuda", enabled=False).state_dict(), ema_updates=30, epoch=3, iteration=30,
        best_val_map50=0.25, best_epoch=2, val_metrics={"voc_map50": 0.2, "voc07_map50": 0.21, "voc_map50_95": 0.1},
        experiment=trained_experiment(tmp_path), dataset_hash="ab" * 32, trainer_version="test", rng=RngState.capture(),
    )
    return Checkpoint(**(fields | changes))


def same(a, b) -> bool:
    """Deep equality of checkpoint values: tensors by value, containers element by element."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    original = checkpoint(tmp_path)
    save_checkpoint(tmp_path / "last.pth", original)
    assert not (tmp_path / "last.tmp").exists()
    on_disk = torch.load(tmp_path / "last.pth", weights_only=True)  # plain values only: no code can run
    assert isinstance(on_disk, dict) and set(on_disk["rng"]) == {"python", "numpy", "torch"}
    loaded = read_checkpoint(tmp_path / "last.pth")
    assert isinstance(loaded.rng, RngState)
    assert same(loaded.to_dict(), original.to_dict())


def test_a_dict_written_by_the_earlier_trainer_loads(tmp_path: Path) -> None:
    """Before Checkpoint, train.py wrote this dict itself: the same 14 keys, the RNG state as a dict."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    legacy = {
        "model": build_model("yolox_nano", 2).state_dict(), "raw_model": {}, "optimizer": {}, "scaler": {},
        "ema_updates": 0, "epoch": 5, "iteration": 50, "best_val_map50": 0.5, "best_epoch": 5,
        "experiment": trained_experiment(tmp_path), "dataset_hash": "0", "val_metrics": {"voc_map50": 0.5},
        "trainer_version": "0.1.0",
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))},
    }
    torch.save(legacy, tmp_path / "best.pth")
    loaded = read_checkpoint(tmp_path / "best.pth")
    assert (loaded.epoch, loaded.best_epoch, loaded.val_metrics) == (5, 5, {"voc_map50": 0.5})
    assert loaded.load_model(tmp_path / "best.pth") is not None


def test_rng_state_replays_the_same_draws() -> None:
    state = RngState.capture()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    state.restore()
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ([1, 2], r"not a checkpoint written by `trainer train` \(a list, not a dict\)"),
        ({"model": {}}, r"\(missing raw_model, optimizer, scaler, ema_updates, epoch"),
        ("bad-rng", "rng state is not python/numpy/torch"),
    ],
    ids=["list", "megvii", "bad-rng"],
)
def test_foreign_files_are_refused(tmp_path: Path, state, match: str) -> None:
    if state == "bad-rng":
        state = checkpoint(tmp_path).to_dict() | {"rng": {"python": random.getstate()}}
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=match):
        read_checkpoint(tmp_path / "x.pth")


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "x.pth").write_text("not a zip")
    with pytest.raises(ValueError, match="x.pth: not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "x.pth")


def test_trained_experiment_drops_settings_this_version_lacks(tmp_path: Path, caplog) -> None:
    old = checkpoint(tmp_path)
    with_extra = replace(old, experiment=old.experiment | {"train": old.experiment["train"] | {"retired_knob": 3}})
    with caplog.at_level(logging.WARNING):
        exp = with_extra.trained_experiment(Path("best.pth"))
    assert exp.name == "tiny" and "dropped setting train.retired_knob" in caplog.text
    broken = replace(old, experiment=old.experiment | {"classes": []})
    with pytest.raises(ValueError, match="best.pth: the experiment stored in the checkpoint is not valid"):
        broken.trained_experiment(Path("best.pth"))


@pytest.mark.parametrize(
    ("files", "target", "expected"),
    [
        (("best.pth", "last.pth"), ".", "best.pth"),
        (("last.pth",), ".", "last.pth"),
        (("last.pth",), "last.pth", "last.pth"),
        ((), ".", FileNotFoundError("run folder has no best.pth or last.pth")),
        ((), "gone.pth", FileNotFoundError("gone.pth: no such checkpoint or run folder")),
    ],
)
def test_resolve_checkpoint(tmp_path: Path, files: tuple[str, ...], target: str, expected) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"")
    if isinstance(expected, Exception):
        with pytest.raises(type(expected), match=str(expected)):
            resolve_checkpoint(tmp_path / target)
    else:
        assert resolve_checkpoint(tmp_path / target) == tmp_path / expected
