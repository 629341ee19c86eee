"""The import graph of app/ and workers/, read with ast (nothing imported): three layers, imports
only pointing down, no loop anywhere.

    shells   routes, dashboard, CLI, Celery app/tasks/beat, HTTP plumbing
      ↓
    domain   app/<domain>/ services, repositories, schemas, state machines; models, settings, db
      ↓
    engines  workers/{learner,inference,graders,clinical,evaluation}: no DB, web or broker
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "workers")
ENGINES = ("workers.learner", "workers.inference", "workers.graders", "workers.clinical",
           "workers.evaluation")
SHELLS = ("app.main", "app.cli", "app.apidocs", "app.problems", "app.dependencies", "app.limits",
          "app.dashboard.routes", "workers.celery_app", "workers.tasks", "workers.beat")
SHELL_SUFFIXES = (".endpoints",)
ENGINE_FORBIDDEN = ("app", "fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic")
DOMAIN_FORBIDDEN = ("fastapi", "celery", "kombu")


def layer(module: str) -> str:
    if module.startswith(ENGINES):
        return "engine"
    if module.startswith(SHELLS) or module.endswith(SHELL_SUFFIXES):
        return "shell"
    return "domain"


@dataclass
class Graph:
    files: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    """module → project modules it imports (anywhere in the file, function bodies included)."""
    external: dict[str, set[str]] = field(default_factory=dict)
    """module → top-level names of other packages it imports."""


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_graph(root: Path) -> Graph:
    files = {module_name(root, p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph = Graph(files)

    def resolve(name: str) -> str | None:
        while name:
            if name in files:
                return name
            name = name.rpartition(".")[0]
        return None

    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges, external = graph.edges.setdefault(mod, set()), graph.external.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base]) if base else ".".join(up)
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target is None:
                    external.add(name.split(".")[0])
                elif target != mod:
                    edges.add(target)
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one file (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
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


def violations(graph: Graph) -> list[str]:
    out = [f"import loop: {' ↔ '.join(c)}" for c in cycles(graph.edges)]
    for mod, targets in sorted(graph.edges.items()):
        for target in sorted(targets):
            if layer(mod) == "engine" and layer(target) != "engine":
                out.append(f"engine {mod} imports {layer(target)} {target}")
            if layer(mod) == "domain" and layer(target) == "shell":
                out.append(f"domain {mod} imports shell {target}")
        forbidden = {"engine": ENGINE_FORBIDDEN, "domain": DOMAIN_FORBIDDEN}.get(layer(mod), ())
        for name in sorted(graph.external[mod] & set(forbidden)):
            out.append(f"{layer(mod)} {mod} imports {name}")
    return out


def test_the_project_has_three_layers_and_no_import_loop() -> None:
    graph = read_graph(ROOT)
    assert {layer(m) for m in graph.files} == {"engine", "domain", "shell"}
    assert violations(graph) == []


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a loop hidden in a function body is still a loop
        ({"app/runs/service.py": "from app.snapshots import service\n",
          "app/snapshots/service.py": "def f():\n    from app.runs import service\n"},
         "import loop: app.runs.service ↔ app.snapshots.service"),
        ({"workers/learner/trainer.py": "from app.settings import get_settings\n",
          "app/settings.py": ""},
         "engine workers.learner.trainer imports domain app.settings"),
        ({"workers/graders/judge.py": "import sqlalchemy\n"},
         "engine workers.graders.judge imports sqlalchemy"),
        ({"app/jobs/service.py": "from workers.celery_app import app\n",
          "workers/celery_app.py": ""},
         "domain app.jobs.service imports shell workers.celery_app"),
        ({"app/snapshots/service.py": "from celery import Celery\n"},
         "domain app.snapshots.service imports celery"),
    ],
)
def test_the_check_fails_on_each_broken_rule(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    write(tmp_path, {"app/__init__.py": "", "workers/__init__.py": ""} | files)
    assert expected in violations(read_graph(tmp_path))


def test_a_graph_that_follows_the_rules_passes(tmp_path: Path) -> None:
    write(tmp_path, {
        "app/__init__.py": "", "workers/__init__.py": "",
        "workers/learner/losses.py": "import torch\n",
        "app/runs/service.py": "from workers.learner import losses\n",
        "app/runs/endpoints.py": "from fastapi import APIRouter\nfrom app.runs import service\n",
        "workers/tasks.py": "from app.runs import service\n",
    })
    assert violations(read_graph(tmp_path)) == []


def test_every_project_import_in_tests_and_benchmarks_names_a_module_that_exists() -> None:
    """Moved modules leave no stale import behind in code the layer check does not walk."""
    graph = read_graph(ROOT)
    missing = []
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom)
                         and not node.level else [])
                for name in names:
                    if name.split(".")[0] in PACKAGES and name not in graph.files:
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert missing == []
