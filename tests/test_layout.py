"""The package layout's rules (STYLE.md, issue 15): SQL lives in appliance/store/ only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "appliance"
#: The one place allowed to hold SQL and to import sqlite3.
STORE = PACKAGE / "store"

#: Statements as the code writes them (upper-case keywords), so prose such as "select a
#: study from the list" in a docstring does not count.
_SQL = [re.compile(p, re.DOTALL) for p in (
    r"\bSELECT\b.*\bFROM\b",
    r"\bINSERT\s+(OR\s+[A-Z]+\s+)?INTO\b",
    r"\bUPDATE\b.*\bSET\b",
    r"\bDELETE\s+FROM\b",
    r"\b(CREATE|DROP|ALTER)\s+(TABLE|INDEX|UNIQUE\s+INDEX|VIEW|TRIGGER)\b",
    r"\bPRAGMA\s+[a-z_]+",
)]


def sql_in(source: str, filename: str) -> list[str]:
    """Return 'file:line: why' for each SQL string constant and sqlite3 import in ``source``."""
    tree = ast.parse(source, filename)
    found: list[tuple[int, str]] = []
    in_fstring: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "sqlite3" or n.startswith("sqlite3.") for n in names):
                found.append((node.lineno, "imports sqlite3"))
            continue
        if isinstance(node, ast.JoinedStr):
            # An f-string's literal parts, with "{}" for each value: f"SELECT 1 FROM {table}".
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            in_fstring.update(id(v) for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstring:
            text = node.value
        else:
            continue
        for pattern in _SQL:
            if m := pattern.search(text):
                found.append((node.lineno, f"SQL {' '.join(m.group(0).split())[:60]!r}"))
                break
    return [f"{filename}:{line}: {why}" for line, why in sorted(found)]


def test_no_module_outside_the_store_holds_sql() -> None:
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if STORE in path.parents:
            continue
        found += sql_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, ("SQL belongs in appliance/store/ (index.py: named queries); call a named query "
                       "of Store or Index instead:\n" + "\n".join(found))


def test_the_check_finds_sql_in_strings_f_strings_and_sqlite3_imports() -> None:
    source = '''
import sqlite3
from sqlite3 import Row
"""Select a study from the list (prose, not SQL)."""
a = "SELECT study_uid FROM studies ORDER BY first_received"
b = ("SELECT s.*, (SELECT count(*) FROM instances i)"
     " FROM series s")
c = f"SELECT 1 FROM {table} WHERE {col} = ?"
d = "INSERT INTO queue (uid) VALUES (?) ON CONFLICT DO NOTHING"
e = "INSERT OR REPLACE INTO instances (x) VALUES (?)"
f = "UPDATE series SET volume_stale = 1"
g = "DELETE FROM queue WHERE uid = ?"
h = """
CREATE TABLE IF NOT EXISTS queue (uid TEXT PRIMARY KEY);
"""
i = "PRAGMA journal_mode=WAL"
'''
    lines = [int(f.split(":")[1]) for f in sql_in(source, "m.py")]
    assert lines == [2, 3, 5, 6, 8, 9, 10, 11, 12, 13, 16], sql_in(source, "m.py")


def test_the_store_itself_is_not_exempt_from_the_check() -> None:
    """The check does find the index's SQL (so an empty result elsewhere means something)."""
    assert sql_in((STORE / "index.py").read_text(encoding="utf-8"), "index.py")


# -- imports point one way: the CLI on top, no circle ---------------------------------------


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every ``appliance`` module ``path`` imports, anywhere in the file
    (a function-local import is a dependency too), and every module named to importlib."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: from . import x
                base = ".".join(this.split(".")[: -node.level] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
            names = [node.value]  # importlib.import_module("appliance.x") and tables of such names
        out += [(node.lineno, n) for n in names if n.startswith("appliance") and n in known and n != this]
    return out


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_library_code_never_imports_the_cli():
    modules = _modules()
    known = set(modules)
    found = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
             for mod, path in modules.items() if not mod.startswith(("appliance.cli", "appliance.__main__"))
             for line, name in imports_of(path, known) if name.startswith("appliance.cli")]
    assert found == [], "library code must not import the CLI (the CLI imports the library):\n" + "\n".join(found)


def test_no_import_circle_between_modules():
    modules = _modules()
    known = set(modules)
    graph = {m: sorted({n for _, n in imports_of(p, known) if n != m and not m.startswith(n + ".")})
             for m, p in modules.items()}
    # A package's __init__ imported by its own modules is not a circle of code.
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, []):
            if state.get(n) == 1:
                circles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert circles == [], "modules that import each other in a circle:\n" + "\n".join(circles)
