"""load_experiment: values that would write outside output_dir or poison a run are refused with file:line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.errors import ConfigError
from synthetic import write_experiment
from trainer.config import Experiment, load_experiment

NAME_ERROR = "Value error, must be one folder name under output_dir: letters, digits, '.', '_', '-', not starting with '.'"


def experiment_yaml(folder: Path, **overrides) -> Path:
    return write_experiment(folder / "exp.yaml", folder / "data", "voc", ("circle", "square"), **overrides)


@pytest.mark.parametrize("name", ["bccd-nano", "run_2.v3", "A", "x..y"])
def test_plain_names_make_a_run_folder_under_output_dir(tmp_path: Path, name: str) -> None:
    exp = load_experiment(experiment_yaml(tmp_path, name=name))
    assert exp.run_dir.parent == exp.output_dir == tmp_path / "runs"


@pytest.mark.parametrize("name", ["..", ".", "../escape", "a/b", "/tmp/x", "a\\b", ".hidden", "-rf", "a b"])
def test_a_name_that_is_not_one_folder_is_refused(tmp_path: Path, name: str) -> None:
    path = experiment_yaml(tmp_path, name=name)
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert str(caught.value) == f"{path}:1: name: {NAME_ERROR} (got {name!r})"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # a new key goes last in its section: train.* at line 24, augment (a new section) from line 25
        ({"train": {"weight_decay": float("inf")}}, ":24: train.weight_decay: Input should be a finite number (got inf)"),
        ({"train": {"lr_per_image": float("nan")}}, ":24: train.lr_per_image: Input should be a finite number (got nan)"),
        ({"augment": {"mosaic_scale": [0.5, float("inf")]}}, ":28: augment.mosaic_scale.1: Input should be a finite number (got inf)"),
        ({"train": {"seed": -1}}, ":24: train.seed: Input should be greater than or equal to 0 (got -1)"),
        ({"train": {"workers": True}}, ":20: train.workers: Input should be a number, not a boolean"),
        ({"augment": {"mosaic_scale": [True, 1.5]}}, ":27: augment.mosaic_scale.0: Input should be a number, not a boolean"),
    ],
    ids=["inf-weight-decay", "nan-lr", "inf-scale", "negative-seed", "bool-workers", "bool-scale"],
)
def test_values_that_would_poison_a_run_are_refused(tmp_path: Path, overrides: dict, expected: str) -> None:
    path = experiment_yaml(tmp_path, **overrides)
    with pytest.raises(ConfigError) as caught:
        load_experiment(path)
    assert str(caught.value) == f"{path}{expected}"


def test_shipped_experiment_loads() -> None:
    exp = load_experiment(Path(__file__).parents[2] / "configs" / "trainer" / "bccd-nano.yaml")
    assert (exp.name, exp.classes) == ("bccd-nano", ("RBC", "WBC", "Platelets"))


# Tokens a careless edit or a hostile file puts where a value was.
NASTY = [
    "", "~", "true", "no", "-1", "0", "1e400", ".inf", "-.nan", "99999999999999999999999", "..", "/", "../..",
    "[]", "{}", "[[[[", "]", "'", '"', "&a x", "*a", "*nope", "<<: *a", "!!binary AAAA", "!!python/object:os.system",
    "? [a]", "\t", "\x00", "\x85", "\ufeff", "@", "`", "%YAML 1.1", "---", "...", "x: y: z", "- - -",
]


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_experiment_yaml_is_loaded_or_refused_naming_the_file(data: st.DataObject) -> None:
    """Any mutation of a valid experiment: an Experiment, or a ConfigError whose every line starts with the file."""
    with tempfile.TemporaryDirectory() as folder:
        path = experiment_yaml(Path(folder))
        lines = path.read_text().splitlines()
        for _ in range(data.draw(st.integers(1, 4), label="edits")):
            index = data.draw(st.integers(0, len(lines) - 1), label="line")
            token = data.draw(st.sampled_from(NASTY) | st.text(max_size=12), label="token")
            edit = data.draw(st.sampled_from(["value", "insert", "delete", "repeat", "indent"]), label="edit")
            key, colon, _ = lines[index].partition(":")
            if edit == "value" and colon:
                lines[index] = f"{key}: {token}"
            elif edit == "insert":
                lines.insert(index, token)
            elif edit == "delete" and len(lines) > 1:
                del lines[index]
            elif edit == "repeat":
                lines.insert(index, lines[index])
            else:
                lines[index] = " " + lines[index]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        try:
            assert isinstance(load_experiment(path), Experiment)
        except ConfigError as exc:
            assert all(line.startswith(f"{path}:") for line in str(exc).splitlines()), str(exc)


def test_fuzz_helper_writes_what_the_loader_reads(tmp_path: Path) -> None:
    """The fuzz test starts from a valid experiment; if this breaks, the fuzz test proves nothing."""
    path = experiment_yaml(tmp_path)
    assert yaml.safe_load(path.read_text())["name"] == load_experiment(path).name == "synthetic"
