"""The runbook file model. Parameters are validated against each check's own model at load time, so
an error names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sentinel.durations import Duration
from sentinel.errors import FileFormatError, RuleFileError
from sentinel.rules.model import LoadedGroup
from sentinel.runbooks import checks as _checks  # noqa: F401 - registers every check
from sentinel.runbooks.base import REGISTRY, Params, Status
from sentinel.yamlfile import format_problems, line_of, load_yaml


class RunbookError(FileFormatError):
    """A runbook file failed validation."""


class Condition(BaseModel):
    """Run the step only when an earlier step ended in one of ``status``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    step: str
    status: list[Status] = Field(min_length=1)


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    check: str
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: Duration = 60.0
    when: Condition | None = None

    @field_validator("check")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in REGISTRY:
            raise ValueError(f"unknown check {v!r}; known: {', '.join(sorted(REGISTRY))}")
        return v

    @field_validator("timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("timeout must be > 0")
        return v

    def typed_params(self) -> Params:
        return REGISTRY[self.check].params.model_validate(self.params)


class Runbook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    description: str = ""
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _order(self) -> Runbook:
        seen: set[str] = set()
        for s in self.steps:
            if s.id in seen:
                raise ValueError(f"duplicate step id {s.id!r}")
            if s.when is not None and s.when.step not in seen:
                raise ValueError(f"step {s.id!r}: when.step {s.when.step!r} is not an earlier step")
            seen.add(s.id)
        return self


def load_runbook(path: Path) -> Runbook:
    try:
        data, lines = load_yaml(path)
    except FileFormatError as exc:
        raise RunbookError(exc.path, exc.problems) from exc
    try:
        rb = Runbook.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise RunbookError(str(path), format_problems(path, exc, lines)) from exc
    problems = []
    for i, step in enumerate(rb.steps):
        try:
            step.typed_params()
        except ValidationError as exc:
            for err in exc.errors():
                loc = ("steps", i, "params", *err["loc"])
                problems.append(f"{path}:{line_of(lines, loc)}: {'.'.join(map(str, loc))}: {err['msg']}")
    if rb.name != path.stem:
        problems.append(f"{path}:{line_of(lines, ('name',))}: name: {rb.name!r} must match the file name {path.stem!r}")
    if problems:
        raise RunbookError(str(path), problems)
    return rb


def check_runbook_references(groups: list[LoadedGroup], books: dict[str, Runbook]) -> None:
    """Every ``sentinel.runbook`` a rule names must exist."""
    problems = [f"{g.file}: group {g.group.name!r}: rule {r.name}: sentinel.runbook: unknown runbook "
                f"{r.sentinel.runbook!r}; known: {', '.join(sorted(books)) or '(none)'}"
                for g in groups for r in g.group.rules if r.sentinel.runbook and r.sentinel.runbook not in books]
    if problems:
        raise RuleFileError(groups[0].file if groups else "", problems)


def load_runbooks(folder: Path) -> dict[str, Runbook]:
    out: dict[str, Runbook] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*.y*ml")):
        try:
            rb = load_runbook(path)
            out[rb.name] = rb
        except FileFormatError as exc:
            problems += exc.problems
    if problems:
        raise RunbookError(str(folder), problems)
    return out

