"""load_yaml_model on hostile or careless YAML: every refusal a ConfigError naming the file and line, no traceback."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from streamd.errors import ConfigError
from streamd.yamlconfig import MAX_EXPANDED_NODES, load_yaml_model


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 0


class Settings(BaseModel):
    """A small model with every kind of number field a config has."""

    model_config = ConfigDict(extra="forbid")
    name: str = "x"
    count: int = 0
    ratio: float = 0.5
    limit: float | None = None
    size: tuple[int, int] = (1, 1)
    flag: bool = False
    either: int | bool = 0
    inner: Inner = Inner()
    items: list[Inner] = []
    weights: dict[str, float] = {}
    max_wait: int = Field(5, alias="max-wait")
    payload: Any = None


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "settings.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_yaml_model(path, Settings)
    return str(caught.value)


def alias_bomb(levels: int, key: str = "payload") -> str:
    """The "billion laughs": level k is a list of nine aliases of level k-1, so the last expands to 9**levels nodes."""
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = [f"  {names[0]}: &{names[0]} [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        aliases = ", ".join(f"*{names[level - 1]}" for _ in range(9))
        lines.append(f"  {names[level]}: &{names[level]} [{aliases}]")
    return f"name: bomb\n{key}:\n" + "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 9])
def test_alias_bomb_is_refused_fast(tmp_path: Path, levels: int) -> None:
    """5 levels (59,049 nodes) was accepted and 9 levels (387 million) ran out of memory."""
    path = write(tmp_path, alias_bomb(levels))
    assert len(path.read_bytes()) < 1000
    started = time.perf_counter()
    message = refusal(path)
    assert time.perf_counter() - started < 0.5
    # the fifth level is the first past the bound: 1 + 9 * 7,381 nodes
    assert message == (
        f"{path}:7: aliases expand this node to 66,430 nodes, more than the {MAX_EXPANDED_NODES:,} a config may hold"
    )


def test_aliases_within_the_bound_are_fine(tmp_path: Path) -> None:
    settings = load_yaml_model(write(tmp_path, alias_bomb(3)), Settings)  # 1 + 9 + 81 + 729 nodes under payload
    assert (len(settings.payload["c"]), len(settings.payload["c"][0]), settings.payload["c"][0][0][0]) == (9, 9, "lol")


def test_keys_brought_by_a_merge_may_be_overridden(tmp_path: Path) -> None:
    base = "payload:\n  base: &base {n: 3}\ninner:\n  <<: *base\n  n: 4\nitems:\n  - *base\n  - <<: *base\n"
    settings = load_yaml_model(write(tmp_path, base), Settings)
    assert (settings.inner.n, [item.n for item in settings.items]) == (4, [3, 3])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("count: 1\nratio: 0.2\ncount: 2\n", ":3: duplicate key 'count' (first at line 1)"),
        ("inner:\n  n: 1\n\n  n: 2\n", ":4: duplicate key 'n' (first at line 2)"),
        ("items:\n  - {n: 1, n: 1}\n", ":2: duplicate key 'n' (first at line 2)"),
        ("weights:\n  on: 1\n  yes: 2\n", ":3: duplicate key 'yes' (first at line 2)"),  # both are the boolean True
        ("payload: &a [*a]\n", ":1: alias *a refers to a node that contains it"),
        ("payload: " + "[" * 200 + "]" * 200 + "\n", ":1: nested deeper than 64 levels"),
        ("name: a\x07b\n", ":1: not valid YAML: character U+0007 is not allowed"),
        ("count: 1\nname: 'a\x07b'\n", ":2: not valid YAML: character U+0007 is not allowed"),
        (b"count: 1\nname: caf\xe9\n", ": not UTF-8 text: byte 0xe9 at offset 18 (line 2): invalid continuation byte"),
        (b"\xff\xfename: x\n", ": not UTF-8 text: byte 0xff at offset 0 (line 1): invalid start byte"),  # UTF-16
        ("count: [1\n", ":2: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ],
    ids=["top-level", "nested", "flow", "same-boolean", "recursive-alias", "deep", "control-char", "control-char-line-2",
         "latin-1", "utf-16", "syntax"],
)
def test_refused_documents_name_the_file_and_line(tmp_path: Path, text: str | bytes, expected: str) -> None:
    path = write(tmp_path, text)
    assert refusal(path) == f"{path}{expected}"


def test_utf8_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    assert load_yaml_model(write(tmp_path, b"\xef\xbb\xbfname: caf\xc3\xa9\n"), Settings).name == "café"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("count: true\n", [":1: count"]),
        ("count: on\n", [":1: count"]),  # YAML 1.1 reads on/yes as true
        ("ratio: false\n", [":1: ratio"]),
        ("limit: true\n", [":1: limit"]),
        ("size: [2, true]\n", [":1: size.1"]),
        ("inner: {n: true}\n", [":1: inner.n"]),
        ("items:\n  - {n: 1}\n  - n: true\n", [":3: items.1.n"]),
        ("weights:\n  a: 1\n  b: true\n", [":3: weights.b"]),
        ("max-wait: true\n", [":1: max-wait"]),
        ("count: true\nname: x\nratio: true\n", [":1: count", ":3: ratio"]),
    ],
    ids=["int", "int-on", "float", "optional-float", "tuple-item", "nested", "list-item", "dict-value", "alias", "two"],
)
def test_a_boolean_is_not_a_number(tmp_path: Path, text: str, expected: list[str]) -> None:
    """pydantic's lax mode reads true as 1: the loader refuses it for every model, without a per-field strict flag."""
    path = write(tmp_path, text)
    assert refusal(path).splitlines() == [f"{path}{where}: Input should be a number, not a boolean" for where in expected]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("flag: true\n", {"flag": True}),
        ("either: true\n", {"either": True}),  # a field that takes a boolean keeps it
        ("either: 3\n", {"either": 3}),
        ("count: 3\nratio: 1\nlimit: 2\nsize: [1, 2]\n", {"count": 3, "ratio": 1.0, "limit": 2.0, "size": (1, 2)}),
        ("payload: {x: true}\nweights: {}\n", {"payload": {"x": True}}),  # Any keeps the boolean
    ],
    ids=["bool", "int-or-bool-true", "int-or-bool-3", "numbers", "any"],
)
def test_booleans_and_numbers_where_they_belong(tmp_path: Path, text: str, expected: dict) -> None:
    settings = load_yaml_model(write(tmp_path, text), Settings)
    assert {key: getattr(settings, key) for key in expected} == expected
    assert [type(getattr(settings, key)) for key in expected] == [type(value) for value in expected.values()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('count: "5"\n', [":1: count"]),
        ("ratio: '0.5'\n", [":1: ratio"]),
        ('size: [1, "2"]\n', [":1: size.1"]),
        ('weights:\n  a: 1\n  b: "2"\n', [":3: weights.b"]),
    ],
    ids=["int", "float", "tuple-item", "dict-value"],
)
def test_a_quoted_string_is_not_a_number(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    assert refusal(path).splitlines() == [f"{path}{where}: Input should be a number, not a quoted string"
                                          for where in expected]  # fmt: skip


def test_a_plain_number_that_yaml_1_1_reads_as_a_string_stays_a_number(tmp_path: Path) -> None:
    """PyYAML reads 1e-3 (no dot) as the string "1e-3"; YAML 1.2 and every user read a number."""
    assert load_yaml_model(write(tmp_path, "ratio: 1e-3\nname: '5'\n"), Settings).ratio == 0.001


@pytest.mark.parametrize("value", ["7" * 5000, "-" + "7" * 65, "0x" + "f" * 63])
def test_an_integer_longer_than_any_setting_is_refused_with_its_line(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"name: x\ncount: {value}\n")
    assert refusal(path) == f"{path}:2: an integer of {len(value)} characters: no setting takes more than 64"


def test_validation_errors_still_name_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ncountt: 3\n")
    assert refusal(path) == f"{path}:2: countt: unknown field; did you mean 'count'?"
