"""Load a YAML file into a pydantic model with errors that name file, line and field.

Shared by streamd's daemon config and the trainer's experiment config, so
both report a bad file the same way:

    configs/room1.yaml:7: streams.0.record.segment_s: Input should be greater than 0 (got -5)
    configs/room1.yaml:3: batch.max_batchh: unknown field; did you mean 'max_batch'?
    configs/room1.yaml:9: duplicate key 'batch' (first at line 3)

Before validation a document is refused when it is not UTF-8, repeats a key
(YAML would keep the last value without a word), nests deeper than MAX_DEPTH,
or expands through aliases to more than MAX_EXPANDED_NODES nodes (a "billion
laughs" bomb: 720 bytes that expand to 10^9 nodes). After validation, a YAML
boolean that a field took as a number (pydantic's lax mode reads `true` as 1)
or a quoted string ("5") is an error too, for every model, without a
per-field strict flag (a plain 1e-3, which YAML 1.1 reads as a string, stays
a number). An integer longer than MAX_INT_CHARS is refused with its line.
"""

from __future__ import annotations

import collections.abc
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from streamd.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# A config holds hundreds of nodes; 10,000 leaves room for any real one and refuses a bomb at its fifth level.
MAX_EXPANDED_NODES = 10_000
MAX_DEPTH = 64  # the composer recurses once per level: refuse long before Python's recursion limit
MAX_INT_CHARS = 64  # an integer longer than this fits no setting (int() refuses 4300 digits with a ValueError)


def read_utf8(path: Path) -> str:
    """The text of a file that must be UTF-8 (a leading BOM dropped).

    Raises OSError when it cannot be read, ValueError naming the file and the
    offset of the first byte that is not UTF-8.
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(
            f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}): {exc.reason}"
        ) from exc


class _Refused(yaml.MarkedYAMLError):
    """A document that parses but is refused before it is built; `problem` says why, `problem_mark` where."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses repeated keys, deep nesting and alias expansion beyond MAX_EXPANDED_NODES.

    An alias shares its anchor's node in the composed graph, so composing and
    constructing a bomb is cheap; what explodes is every walk over the result
    (the line map, pydantic). The composer therefore counts each node's size
    with its aliases expanded (memoised, so counting is linear in the text).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded_size: dict[int, int] = {}  # id(node) -> its node count with aliases expanded
        self._depth = 0

    def compose_node(self, parent, index):
        alias = self.peek_event() if self.check_event(yaml.AliasEvent) else None
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=self.peek_event().start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias is not None:
            if id(node) not in self._expanded_size:
                raise _Refused(problem=f"alias *{alias.anchor} refers to a node that contains it", problem_mark=alias.start_mark)
            return node
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        size = 1 + sum(self._expanded_size[id(child)] for child in children)
        if size > MAX_EXPANDED_NODES:
            problem = f"aliases expand this node to {size:,} nodes, more than the {MAX_EXPANDED_NODES:,} a config may hold"
            raise _Refused(problem=problem, problem_mark=node.start_mark)
        self._expanded_size[id(node)] = size
        return node

    def construct_bounded_int(self, node):
        """An integer scalar, refused (with its line) when it is longer than any setting could take."""
        if len(node.value) > MAX_INT_CHARS:
            problem = f"an integer of {len(node.value)} characters: no setting takes more than {MAX_INT_CHARS}"
            raise _Refused(problem=problem, problem_mark=node.start_mark)
        return self.construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        """Refuse a key given twice; keys brought in by a merge (`<<: *base`) may be overridden, as YAML intends."""
        first_line: dict = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if not isinstance(key, collections.abc.Hashable):
                break  # the base class refuses it with its own message
            if key in first_line:
                problem = f"duplicate key {key_node.value!r} (first at line {first_line[key]})"
                raise _Refused(problem=problem, problem_mark=key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_bounded_int)


def _node_lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Map every key path of a composed YAML document to its 1-based line."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            lines[child] = key.start_mark.line + 1
            lines.update({k: v for k, v in _node_lines(value, child).items() if k != child})
    elif isinstance(node, yaml.SequenceNode):
        for index, value in enumerate(node.value):
            lines.update(_node_lines(value, (*path, index)))
    return lines


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model that `loc` (minus its last part) points into."""
    current: type | None = model
    parts = list(loc[:-1])
    for index, part in enumerate(parts):
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # a tagged-union branch name in the location: already resolved below
        following = parts[index + 1] if index + 1 < len(parts) else None
        current = _inner_model(field.annotation, following)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in (getattr(annotation, "__args__", ()) or ()) for m in _models_in(arg)]


def _inner_model(annotation, tag=None) -> type | None:
    """The model inside an annotation; for a tagged union, the member whose Literal tag is `tag`."""
    models = _models_in(annotation)
    for candidate in models:
        for field in candidate.model_fields.values():
            if tag is not None and tag in (getattr(field.annotation, "__args__", ()) or ()):
                return candidate
    return models[0] if models else None


def _yaml_path(loc: tuple, lines: dict[tuple, int]) -> tuple:
    """The location as YAML keys: union tags dropped, a missing last field kept."""
    path: tuple = ()
    for index, part in enumerate(loc):
        if (*path, part) in lines or index == len(loc) - 1:
            path = (*path, part)
    return path


def format_errors(path: Path, model: type[BaseModel], exc: ValidationError, lines: dict[tuple, int]) -> str:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        yaml_loc = _yaml_path(loc, lines)
        line = _nearest_line(lines, yaml_loc)
        field = ".".join(str(p) for p in yaml_loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            choices = _allowed_fields(model, loc)
            close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(choices)}"
            out.append(f"{path}:{line}: {field}: unknown field{hint}")
        else:
            got = err.get("input")
            shown = repr(got) if len(repr(got)) <= 120 else f"{repr(got)[:80]}...{repr(got)[-30:]}"
            got_text = "" if isinstance(got, dict) or got is None else f" (got {shown})"
            out.append(f"{path}:{line}: {field}: {err['msg']}{got_text}")
    return "\n".join(out)


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


_MISSING = object()


def _member(value: object, key: object) -> object:
    """The field, or dict entry, of a validated value that the YAML key `key` set; _MISSING when there is none."""
    if isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            if key in (name, field.alias):
                return getattr(value, name)
    elif isinstance(value, dict):
        return value.get(key, _MISSING)
    return _MISSING


def _quoted_scalars(node: yaml.Node, path: tuple = ()) -> set[tuple]:
    """Key paths of the scalars written in quotes ("5", '5'): strings, whatever they look like."""
    if isinstance(node, yaml.ScalarNode):
        return {path} if node.style in ("'", '"') else set()
    if isinstance(node, yaml.MappingNode):
        return {found for key, value in node.value for found in _quoted_scalars(value, (*path, key.value))}
    if isinstance(node, yaml.SequenceNode):
        return {found for index, value in enumerate(node.value) for found in _quoted_scalars(value, (*path, index))}
    return set()


def _numbers_from_non_numbers(data: object, value: object, quoted: set[tuple], loc: tuple = ()) -> list[tuple]:
    """(location, what the YAML holds) where the validated model holds a number read from a boolean or a quoted
    string (pydantic's lax int and float read `true` as 1 and "5" as 5.0)."""
    if isinstance(data, (bool, str)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and isinstance(data, bool):
            return [(loc, "a boolean")]
        return [(loc, "a quoted string")] if number and loc in quoted else []
    if isinstance(data, dict):
        return [found for key, item in data.items()
                for found in _numbers_from_non_numbers(item, _member(value, key), quoted, (*loc, key))]  # fmt: skip
    if isinstance(data, list) and isinstance(value, (list, tuple)) and len(data) == len(value):
        return [found for i, item in enumerate(data)
                for found in _numbers_from_non_numbers(item, value[i], quoted, (*loc, i))]  # fmt: skip
    return []


def _parse(path: Path, text: str) -> tuple[yaml.Node | None, object]:
    """The composed document (for line numbers) and its Python value; ConfigError naming file and line."""
    loader = None
    try:
        loader = _BoundedLoader(text)
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{path}:{line}: not valid YAML: character U+{exc.character:04X} is not allowed") from exc
    except _Refused as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_model(path: str | Path, model: type[M], context: dict | None = None) -> M:
    """Parse and validate `path` as `model`; raise ConfigError with every problem listed."""
    path = Path(path)
    try:
        text = read_utf8(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    node, data = _parse(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings at the top level")
    try:
        loaded = model.model_validate(data, context={"base_dir": path.parent, **(context or {})})
    except ValidationError as exc:
        raise ConfigError(format_errors(path, model, exc, _node_lines(node))) from exc
    not_numbers = _numbers_from_non_numbers(data, loaded, _quoted_scalars(node))
    if not_numbers:
        lines = _node_lines(node)
        raise ConfigError("\n".join(
            f"{path}:{_nearest_line(lines, loc)}: {'.'.join(map(str, loc))}: Input should be a number, not {what}"
            for loc, what in not_numbers
        ))
    return loaded


def field_lines(path: str | Path) -> Callable[[tuple], int]:
    """For a config that loaded: the YAML line of a field path such as ("streams", 0, "record", "dir").

    Checks made after validation (streamd.preflight) use it to name the line like validation errors do.
    """
    path = Path(path)
    node, _ = _parse(path, read_utf8(path))
    lines = _node_lines(node)
    return lambda loc: _nearest_line(lines, tuple(loc))
