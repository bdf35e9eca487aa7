"""The package layers, lowest first: a module may import from its own package and the layers below, never
above (no cycles). Checked on every `import` and `from ... import` in the source, function bodies included."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

# each package, and the sentinel packages it must not import
FORBIDDEN = {
    "alerts": ["rules", "generate", "logstore", "runbooks", "remediation", "inbound", "api", "daemon", "cli"],
    "rules": ["generate", "logstore", "runbooks", "remediation", "inbound", "api", "daemon", "cli"],
    "logstore": ["generate", "runbooks", "remediation", "inbound", "api", "daemon", "cli"],
    "generate": ["runbooks", "remediation", "inbound", "api", "daemon", "cli"],
}


def imports(path: object) -> set[str]:
    tree = ast.parse(open(str(path)).read())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sentinel."):
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
