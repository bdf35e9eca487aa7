"""The package layers, lowest first: a module may import from its own package and the layers below, never
above (no cycles). Checked on every `import` and `from ... import` in the source, function bodies included."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

# each package, and the sentinel packages it must not import
FORBIDDEN = {
    "state": ["alerts", "rules", "generate", "logstore", "runbooks", "remediation", "inbound", "api", "daemon", "cli",
              "capabilities"],
    "alerts": ["rules", "generate", "logstore", "runbooks", "remediation", "inbound", "api", "daemon", "cli"],
    "rules": ["generate", "logstore", "runbooks", "remediation", "inbound", "api", "daemon", "cli"],
    "logstore": ["generate", "runbooks", "remediation", "inbound", "api", "daemon", "cli"],
    "generate": ["runbooks", "remediation", "inbound", "api", "daemon", "cli"],
}


def imports(path: object) -> set[str]:
    """The sentinel units (a package or a top-level module) a file imports: ``import sentinel.x.y``,
    ``from sentinel.x import y`` and ``from sentinel import x``, type-only imports included."""
    tree = ast.parse(open(str(path)).read())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "sentinel":
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sentinel."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sentinel."))
    return out


def test_no_package_imports_a_layer_above_it() -> None:
    problems = []
    for package, banned in FORBIDDEN.items():
        files = sorted((ROOT / "sentinel" / package).rglob("*.py"))
        assert files, package
        for f in files:
            bad = imports(f) & set(banned)
            if bad:
                problems.append(f"{f.relative_to(ROOT)} imports sentinel.{', sentinel.'.join(sorted(bad))}")
    assert problems == []


def test_no_import_cycles_between_packages_and_top_level_modules() -> None:
    """Every unit of sentinel (each package and each top-level module) against every other: the import graph
    between units has no cycle, type-only imports (under TYPE_CHECKING) counted, so that a module like
    metrics.py cannot tie two packages into a loop that the package rules above do not see."""
    units: dict[str, set[str]] = {}
    for f in sorted((ROOT / "sentinel").rglob("*.py")):
        unit = f.relative_to(ROOT / "sentinel").parts[0].removesuffix(".py")
        if unit != "__init__":
            units.setdefault(unit, set()).update(imports(f) - {unit})
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = 1
        for dep in sorted(units.get(unit, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[unit] = 2

    for unit in sorted(units):
        if unit not in state:
            visit(unit, [unit])
    assert cycles == [], " ; ".join(" -> ".join(c) for c in cycles)


def test_no_function_class_or_module_outgrows_the_size_targets() -> None:
    """The redesign's targets (issue 25): no function over 60 lines, no class over 250, no module over 500, in
    sentinel/ and inference_core/ (the C++ kernels and generated files are not Python here)."""
    problems = []
    for f in sorted([*(ROOT / "sentinel").rglob("*.py"), *(ROOT / "inference_core").rglob("*.py")]):
        text = f.read_text()
        name = f.relative_to(ROOT)
        if text.count("\n") > 500:
            problems.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                assert node.end_lineno is not None
                size, limit = node.end_lineno - node.lineno + 1, 250 if isinstance(node, ast.ClassDef) else 60
                if size > limit:
                    problems.append(f"{name}:{node.lineno} {node.name}: {size} lines (at most {limit})")
    assert problems == []
