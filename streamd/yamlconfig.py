"""Load a YAML file into a pydantic model with errors that name file, line and field.

Shared by streamd's daemon config and the trainer's experiment config, so
both report a bad file the same way:

    configs/room1.yaml:7: streams.0.record.segment_s: Input should be greater than 0 (got -5)
    configs/room1.yaml:3: batch.max_batchh: unknown field; did you mean 'max_batch'?
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from streamd.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


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
            got_text = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            out.append(f"{path}:{line}: {field}: {err['msg']}{got_text}")
    return "\n".join(out)


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int:
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def load_yaml_model(path: str | Path, model: type[M], context: dict | None = None) -> M:
    """Parse and validate `path` as `model`; raise ConfigError with every problem listed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping of settings at the top level")
    try:
        return model.model_validate(data, context={"base_dir": path.parent, **(context or {})})
    except ValidationError as exc:
        lines = _node_lines(node) if node is not None else {}
        raise ConfigError(format_errors(path, model, exc, lines)) from exc
