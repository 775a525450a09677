"""The import rules of the layout (README, "Code map"), read from the source itself.

- No import circle between the product's modules.
- Nothing imports ``bot`` (the entry point and the wiring); the loop never reaches back to it.
- Adapters (Kraken, the stores, the market sources, the HTTP server, the LLM client) never
  import the loop, the policies or the page.
- Policies do no I/O: they import no network, database, process or thread module, and no adapter.
- The ground floor (shared words, errors, clocks, candles, health, retries, redaction) imports
  nothing above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_PRODUCT = {"tests", "research", "tools", ".venv", "__pycache__", ".git"}

ADAPTERS = (
    "kraken.",
    "store.sqlite",
    "store.supabase",
    "store.mirrored",
    "store.migration",
    "market.",
    "http_api",
    "ai_advisor",
)
POLICIES = (
    "regime.policy",
    "regime.training_depth",
    "regime.direction_skill",
    "advisor.policy",
    "grid.engine",
    "grid.signals",
    "health",
    "loop.snapshots",
)
GROUND = ("vocabulary", "errors", "clock", "candles", "health", "retry", "redaction")
PAGE = ("dashboard",)
LOOP = ("loop.", "bot")
IO_MODULES = {"requests", "httpx", "sqlite3", "socket", "http", "urllib", "subprocess", "threading",
              "openai", "supabase", "postgrest", "multiprocessing", "selectors"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        if not NOT_PRODUCT.intersection(path.relative_to(ROOT).parts):
            out[module_name(path)] = path
    return out


MODULES = product_modules()


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def project_imports(name: str) -> set[str]:
    return {m for m in imports_of(MODULES[name]) if m in MODULES and m != name}


def matches(name: str, group: tuple[str, ...]) -> bool:
    return any(name == g or (g.endswith(".") and name.startswith(g)) for g in group)


def test_the_rules_see_the_whole_product():
    assert {"bot", "config", "loop.cycle", "grid.engine", "kraken.public_client", "store.sqlite"} <= set(MODULES)
    for group in (ADAPTERS, POLICIES, PAGE, LOOP, GROUND):  # a renamed module must not silently leave its rule
        for g in group:
            assert any(matches(m, (g,)) for m in MODULES), g


def test_no_import_circle():
    graph = {name: project_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_nothing_imports_the_entry_point():
    assert [name for name in MODULES if "bot" in project_imports(name)] == []


def test_adapters_never_import_the_loop_the_policies_or_the_page():
    bad = {
        name: sorted(dep for dep in project_imports(name) if matches(dep, LOOP + POLICIES + PAGE))
        for name in MODULES
        if matches(name, ADAPTERS)
    }
    assert {name: deps for name, deps in bad.items() if deps} == {}


def test_the_ground_floor_imports_only_the_ground_floor():
    bad = {name: sorted(project_imports(name) - set(GROUND)) for name in MODULES if matches(name, GROUND)}
    assert {name: deps for name, deps in bad.items() if deps} == {}


def test_policies_do_no_io():
    bad = {}
    for name in MODULES:
        if not matches(name, POLICIES):
            continue
        found = imports_of(MODULES[name])
        io = sorted(m for m in found if m.split(".")[0] in IO_MODULES)
        adapters = sorted(dep for dep in project_imports(name) if matches(dep, ADAPTERS + LOOP + PAGE))
        if io or adapters:
            bad[name] = io + adapters
    assert bad == {}
