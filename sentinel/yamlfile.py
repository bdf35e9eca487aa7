"""Load YAML keeping line numbers, and report pydantic errors as ``file:line: field: problem``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sentinel.errors import FileFormatError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


def _lines(node: yaml.Node, loc: Loc, out: dict[Loc, int]) -> None:
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[(*loc, k)] = key.start_mark.line + 1
            _lines(value, (*loc, k), out)
            out[(*loc, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*loc, i), out)


def load_yaml(path: Path, text: str | None = None) -> tuple[Any, dict[Loc, int]]:
    """Parse ``path``; returns the data and a map from each key path to its line number."""
    if text is None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise FileFormatError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FileFormatError(str(path), [f"{path}{line}: YAML syntax error: {problem}"]) from exc
    lines: dict[Loc, int] = {}
    if node is not None:
        _lines(node, (), lines)
    return data, lines


def line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of the deepest existing prefix of ``loc`` (a missing field points at its parent)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def format_problems(path: Path, exc: ValidationError, lines: dict[Loc, int]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
        field = ".".join(str(p) for p in loc) or "(document)"
        out.append(f"{path}:{line_of(lines, loc)}: {field}: {err['msg']}")
    return out


def load_model_file(path: Path, model: type[M], error: type[FileFormatError] = FileFormatError,
                    text: str | None = None) -> M:
    """Validate a YAML file against a pydantic model; errors name file, line and field."""
    try:
        data, lines = load_yaml(path, text)
    except FileFormatError as exc:
        raise error(exc.path, exc.problems) from exc
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise error(str(path), format_problems(path, exc, lines)) from exc
