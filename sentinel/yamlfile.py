"""Load YAML keeping line numbers, and report pydantic errors as ``file:line: field: problem``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ValidationError

from sentinel.errors import FileFormatError

M = TypeVar("M", bound=BaseModel)
Loc = tuple[str | int, ...]


def _lines(node: yaml.Node, loc: Loc, out: dict[Loc, int], seen: dict[int, int]) -> None:
    out[loc] = node.start_mark.line + 1
    if id(node) in seen:  # an alias: its lines are those of the anchor, recorded once
        return
    seen[id(node)] = 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[(*loc, k)] = key.start_mark.line + 1
            _lines(value, (*loc, k), out, seen)
            out[(*loc, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*loc, i), out, seen)


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it: ~10x faster


class ScalarInt(int):
    """An int that remembers the scalar it was written as (``010``, ``1_000``, ``0x1f``)."""

    text: str


class ScalarFloat(float):
    """A float that remembers the scalar it was written as (``1e3``, ``.5``, ``1.50``)."""

    text: str


class _Loader(_BaseLoader):  # type: ignore[misc, valid-type]
    """The safe loader, with numbers that keep their source text: Prometheus's Go YAML decoders put the
    scalar's text into a string field whatever it resolves to (``values: 1``, ``expr: 1``), and so does
    ``YamlStr`` here."""


def _construct_int(loader: Any, node: yaml.ScalarNode) -> int:
    out = ScalarInt(loader.construct_yaml_int(node))
    out.text = node.value
    return out


def _construct_float(loader: Any, node: yaml.ScalarNode) -> float:
    out = ScalarFloat(loader.construct_yaml_float(node))
    out.text = node.value
    return out


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
for _dumper in {yaml.SafeDumper, getattr(yaml, "CSafeDumper", yaml.SafeDumper)}:
    _dumper.add_representer(ScalarInt, yaml.representer.SafeRepresenter.represent_int)
    _dumper.add_representer(ScalarFloat, yaml.representer.SafeRepresenter.represent_float)


def scalar_text(value: Any) -> Any:
    """A YAML number or boolean read as the string it was written as (as Go's YAML decoders do for a
    string field); anything else unchanged, for the string validation to judge."""
    if isinstance(value, bool):
        return "true" if value else "false"  # YAML 1.1's yes/on are lost by then; Go's YAML 1.2 has no such bools
    text = getattr(value, "text", None)
    if isinstance(value, int | float) and isinstance(text, str):
        return text
    if isinstance(value, int | float):
        return repr(value)
    return value


YamlStr = Annotated[str, BeforeValidator(scalar_text)]
"""A string field that also takes an unquoted number or boolean, as Prometheus's file formats do."""
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_NODES = 2_000_000  # nodes after alias expansion: a billion-laughs file is refused, not expanded
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text without control characters (other than tab and newlines), or a FileFormatError naming
    the line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FileFormatError(str(path), [f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                                          f"{exc.start}); is this a rule file?"]) from exc
    m = _CONTROL.search(text)
    if m is not None:
        line = text.count("\n", 0, m.start()) + 1
        raise FileFormatError(str(path), [f"{path}:{line}: control character U+{ord(m.group(0)):04X} in the text; "
                                          "is this a rule file?"])
    return text


def _expanded_size(node: yaml.Node, memo: dict[int, int], path: Path) -> int:
    """The number of nodes the document has once aliases are expanded (shared nodes counted each time),
    computed without expanding: linear in the file."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once (PyYAML refuses those on construction anyway)
    size = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            size += _expanded_size(k, memo, path) + _expanded_size(v, memo, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, memo, path)
    if size > MAX_NODES:
        raise FileFormatError(str(path), [f"{path}:{node.start_mark.line + 1}: YAML aliases expand to more than "
                                          f"{MAX_NODES:,} nodes here (an alias bomb?); refused"])
    memo[key] = size
    return size


def load_yaml(path: Path, text: str | None = None) -> tuple[Any, dict[Loc, int]]:
    """Parse ``path`` once; returns the data and a map from each key path to its line number.

    Refused with file:line before anything is built: files over 32 MiB, bytes that are not UTF-8,
    control characters, and aliases that would expand past 2,000,000 nodes."""
    if text is None:
        try:
            with path.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise FileFormatError(str(path), [f"{path}: cannot read: {exc.strerror}"]) from exc
        if len(raw) > MAX_FILE_BYTES:
            raise FileFormatError(str(path), [f"{path}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; split it "
                                              "into several files"])
        text = _decode(path, raw)
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _expanded_size(node, {}, path)
                data = loader.construct_document(node)
            else:
                data = None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FileFormatError(str(path), [f"{path}{line}: YAML syntax error: {problem}"]) from exc
    except RecursionError as exc:
        raise FileFormatError(str(path), [f"{path}: nested too deeply"]) from exc
    lines: dict[Loc, int] = {}
    if node is not None:
        _lines(node, (), lines, {})
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
    return load_model_file_lines(path, model, error, text)[0]


def load_model_file_lines(path: Path, model: type[M], error: type[FileFormatError] = FileFormatError,
                          text: str | None = None) -> tuple[M, dict[Loc, int]]:
    """As ``load_model_file``, with the map of key paths to line numbers (the file is parsed once)."""
    try:
        data, lines = load_yaml(path, text)
    except FileFormatError as exc:
        raise error(exc.path, exc.problems) from exc
    try:
        return model.model_validate(data if data is not None else {}), lines
    except ValidationError as exc:
        raise error(str(path), format_problems(path, exc, lines)) from exc
