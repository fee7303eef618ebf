"""Guards that keep the code and its documentation in step (datasette style), and the module
graph free of cycles:

- every error code the code can answer with is documented in docs/;
- every route of the neuron is in the contract table of docs/architecture.md, and every route
  there exists;
- every member of every plugin Protocol is documented in docs/plugins.md;
- no import cycle among the modules of ``src/``, the plugins and the examples (lazy imports and
  imports under ``TYPE_CHECKING`` included: a cycle is a cycle however it is spelled).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cortex import eviction, harness, source
from cortex.plugins import protocol_members

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [
    ROOT / "src",
    *sorted(p / "src" for p in (ROOT / "plugins").iterdir() if (p / "src").is_dir()),
    *sorted(p / "src" for p in (ROOT / "examples").iterdir() if (p / "src").is_dir()),
]
DOCS = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))

# Calls whose second positional argument is an error code answered to a client.
ERROR_TYPES = {"ApiError", "UpstreamUnreachable", "ClientGone", "BodyTooLarge", "LimitError"}
# Codes of base classes no code raises as such (each subclass has its own, documented, code).
BASE_CODES = {
    "invalid_model_id": "cortex.source.ModelIdError, the base of the id-grammar errors",
    "source_error": "cortex.source.SourceError, the base of the source errors",
}


def python_files() -> list[Path]:
    return [p for base in SOURCES for p in base.rglob("*.py")]


def error_codes() -> dict[str, set[str]]:
    """code -> the files that answer with it: ``ApiError(status, "code", ...)``,
    ``bad_request(..., code="...")`` and the ``kind``/``code`` of error classes."""
    found: dict[str, set[str]] = {}
    for path in python_files():
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                args = node.args
                if name in ERROR_TYPES and len(args) >= 2 and _text(args[1]) is not None:
                    found.setdefault(str(_text(args[1])), set()).add(where)
                for keyword in node.keywords:
                    if keyword.arg == "code" and name in (*ERROR_TYPES, "bad_request"):
                        code = _text(keyword.value)
                        if code is not None:
                            found.setdefault(code, set()).add(where)
            elif isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                for statement in node.body:
                    if (
                        isinstance(statement, ast.Assign)
                        and any(
                            getattr(t, "id", None) in ("kind", "code") for t in statement.targets
                        )
                        and _text(statement.value) is not None
                    ):
                        found.setdefault(str(_text(statement.value)), set()).add(where)
    return found


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def test_the_error_code_scan_finds_codes() -> None:
    codes = error_codes()
    assert {"model_not_found", "insufficient_memory", "no_loadable_weights", "queue_full"} <= set(
        codes
    )
    assert len(codes) > 50


@pytest.mark.parametrize("code", sorted(set(error_codes()) - set(BASE_CODES)))
def test_every_error_code_is_documented(code: str) -> None:
    """In code formatting somewhere in docs/ (a table cell, ``403 admin_key_required``, an
    envelope example)."""
    assert re.search(rf"`[^`\n]*\b{re.escape(code)}\b[^`\n]*`", DOCS), (
        f"error code {code!r} (answered by {sorted(error_codes()[code])}) is in no docs/*.md: "
        "add it where its route's errors are listed"
    )


def test_base_codes_are_never_raised_themselves() -> None:
    raised = {
        m.group(1)
        for path in python_files()
        for m in re.finditer(r"raise (ModelIdError|SourceError)\(", path.read_text())
    }
    assert raised == set()


# ---- the neuron's routes against docs/architecture.md -------------------------------------


def neuron_contract() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The neuron HTTP API", 1)[1]
    return set(re.findall(r"`((?:GET|POST|PUT|DELETE|PATCH) /[^`\s]*)`", section))


def test_every_neuron_route_is_in_the_contract_table() -> None:
    from cortex.config import NeuronConfig
    from cortex.neuron.daemon import build_node, make_app

    app = make_app(build_node(NeuronConfig()), drain_seconds=1)
    served = {
        f"{method} {route.path}"
        for route in app.routes
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }
    documented = neuron_contract()
    assert served - documented == set(), "routes of the neuron missing from docs/architecture.md"
    assert documented - served == set(), "docs/architecture.md names routes the neuron lacks"


# ---- plugin Protocols against docs/plugins.md ---------------------------------------------

PROTOCOLS = [
    harness.Harness,
    harness.LoadedModel,
    harness.Generation,
    harness.BatchedModel,
    harness.BatchedGeneration,
    source.SourcePlugin,
    source.ModelSource,
    eviction.EvictionStrategy,
]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_every_protocol_member_is_documented(protocol: type) -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    members = protocol_members(protocol)
    assert members, protocol
    missing = [
        m
        for m in members
        if f"`{m}`" not in docs
        and f"`{m}(" not in docs
        and f"def {m}(" not in docs
        and not re.search(rf"^\s+{m}(: |\s*=)", docs, re.MULTILINE)
    ]
    assert missing == [], f"{protocol.__name__}: {missing} not in docs/plugins.md"


# ---- import cycles -------------------------------------------------------------------------


def import_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for base in SOURCES:
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base_parts, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                # ``from pkg import sub`` depends on the submodule, not on pkg's __init__
                subs = {f"{target}.{alias.name}" for alias in node.names}
                known = subs & modules.keys()
                deps.update(known)
                if len(known) < len(subs):
                    deps.add(target)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert "cortex.gateway.scheduler" in graph
    assert "cortex_source_huggingface.hub" in graph
    assert "cortex_harness_torch.batched" in graph
    assert cycles(graph) == []
