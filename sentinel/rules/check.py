"""`sentinel rules check`: everything that can be known about a rule file without running it."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from sentinel.alerts.templates import check as check_template
from sentinel.errors import FileFormatError
from sentinel.rules.export import promtool_problems
from sentinel.rules.model import LoadedGroup, load_rule_file_lines
from sentinel.yamlfile import line_of


def check_file(path: Path, promtool: str = "promtool", runbooks: Collection[str] | None = None
               ) -> tuple[list[str], list[str], int]:
    """(errors, lint warnings, number of rules), each problem as ``file:line: field: problem``.
    ``runbooks``: the names a ``sentinel.runbook`` may take (None: not checked)."""
    try:
        groups, lines = load_rule_file_lines(path)
    except FileFormatError as exc:
        return exc.problems, [], 0
    errors: list[str] = []
    lints: list[str] = []

    def at(gi: int, ri: int, *field: str | int) -> str:
        loc = ("groups", gi, "rules", ri, *field)
        return f"{path}:{line_of(lines, loc)}: {'.'.join(map(str, loc))}"

    # duplicates as promtool's lint finds them: the same name and labels anywhere in the file, across groups
    # (one lint per duplicated name and label set, however many copies, as promtool counts them)
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[int, int]]] = {}
    for gi, lg in enumerate(groups):
        for ri, rule in enumerate(lg.group.rules):
            for kind in ("annotations", "labels"):
                for key, text in getattr(rule, kind).items():
                    err = check_template(text)
                    if err is not None:
                        errors.append(f"{at(gi, ri, kind, key)}: {err}")
            book = rule.sentinel.runbook
            if runbooks is not None and book is not None and book not in runbooks:
                errors.append(f"{at(gi, ri, 'sentinel', 'runbook')}: unknown runbook {book!r}; known: "
                              f"{', '.join(sorted(runbooks)) or '(none)'}")
            ident = (rule.name, tuple(sorted(rule.labels.items())))
            seen.setdefault(ident, []).append((gi, ri))
    for (name, _), places in seen.items():
        if len(places) > 1:
            others = ", ".join(f"groups.{g}.rules.{r}" for g, r in places[:1] + places[2:])
            lints.append(f"{at(*places[1])}: duplicate rule {name}: {len(places)} rules with this name and these "
                         f"labels (also {others})")
    errors += _promql(path, groups, lines, promtool, lints)
    return errors, lints, sum(len(g.group.rules) for g in groups)


def _promql(path: Path, groups: list[LoadedGroup], lines: dict[tuple[str | int, ...], int], promtool: str,
            lints: list[str]) -> list[str]:
    try:
        found = promtool_problems(groups, promtool)
    except FileNotFoundError as exc:
        lints.append(f"{path}: PromQL not parsed: {exc}")
        return []
    index = {lg.group.name: gi for gi, lg in enumerate(groups)}
    out = []
    for group, ri, msg in found:
        gi = index.get(group)
        if gi is None or ri is None:
            out.append(f"{path}: promtool: {msg}")
            continue
        loc = ("groups", gi, "rules", ri, "expr")
        # promtool's template errors are already reported above with our own line numbers
        if "could not parse expression" in msg or "expr" in msg:
            out.append(f"{path}:{line_of(lines, loc)}: {'.'.join(map(str, loc))}: {msg}")
    return out
