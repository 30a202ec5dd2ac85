"""The container image, checked without a Docker engine.

There is no engine on the CI machine, so the Dockerfile is checked statically
(stages, non-root user, health check, ports, config path) and its build stage
is replayed: the files it COPYs (minus .dockerignore) are copied to a temporary
context, the wheel is built from there as ``pip wheel`` does in the image, and
the runtime stage's import smoke test runs against the unpacked wheel. The
health probe itself is tested against a real server in
tests/server/test_healthcheck.py.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from server._config import load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        bare = pat.removeprefix("**/")
        for i in range(len(parts)):
            if fnmatch.fnmatch("/".join(parts[: i + 1]), pat) or fnmatch.fnmatch(parts[i], bare):
                return True
    return False


def test_two_stages_on_a_slim_python_311_base() -> None:
    args = dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    build, runtime = stages()
    assert build[0][1] == "${PYTHON_IMAGE} AS build"
    assert runtime[0][1] == "${PYTHON_IMAGE} AS runtime"
    assert any(k == "RUN" and "pip wheel" in a for k, a in build)
    install = [a for k, a in runtime if k == "RUN" and "pip install" in a]
    assert len(install) == 1
    assert "--no-index" in install[0]
    assert "from=build" in install[0]


def test_runtime_runs_as_a_non_root_user_with_health_check_and_ports() -> None:
    runtime = stages()[-1]
    (user,) = [a for k, a in runtime if k == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 1000
    assert any(k == "RUN" and f"--uid {uid}" in a for k, a in runtime)
    (health,) = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert '"-m", "server.healthcheck"' in health
    assert re.search(r"--interval=\d+s", health)
    assert re.search(r"--timeout=\d+s", health)
    (expose,) = [a for k, a in runtime if k == "EXPOSE"]
    assert expose.split() == ["50051", "2112"]
    assert ("ENTRYPOINT", '["pool-server"]') in runtime
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    # The last instruction touching the filesystem as root comes before USER.
    order = [k for k, _ in runtime]
    assert order.index("USER") > max(i for i, k in enumerate(order) if k in ("RUN", "COPY"))


def test_baked_config_is_where_pool_config_points_and_is_valid(tmp_path: Path) -> None:
    runtime = stages()[-1]
    env = " ".join(a for k, a in runtime if k == "ENV")
    config_path = re.search(r"POOL_CONFIG=(\S+)", env)
    assert config_path
    (copy,) = [a for k, a in runtime if k == "COPY" and config_path.group(1) in a]
    source = copy.split()[-2]
    settings = load_settings([], {"POOL_CONFIG": str(REPO / source)})
    # Reachable from outside the container, on the exposed ports.
    assert settings.grpc.address == "0.0.0.0:50051"
    assert settings.metrics.address == "0.0.0.0:2112"
    assert settings.log.format == "json"
    # The environment overrides the file (how images are configured).
    prod = load_settings(
        [],
        {
            "POOL_CONFIG": str(REPO / source),
            "EVENTBUS__KAFKA__BROKERS": "kafka-0:9092,kafka-1:9092",
            "KAFKA_USE_ACTOR_POOL": "true",
        },
    )
    assert prod.kafka.brokers == ("kafka-0:9092", "kafka-1:9092")
    assert not prod.use_embedded_broker
    assert prod.mode == "actor"


def test_build_context_holds_every_copied_path() -> None:
    patterns = dockerignore()
    for stage in stages():
        for kind, args in stage:
            if kind != "COPY" or "--from=" in args:
                continue
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), src
                assert not ignored(src.rstrip("/"), patterns), f"{src} excluded by .dockerignore"
    for local_state in (".venv", ".git", "tests", "server/__pycache__"):
        assert ignored(local_state, patterns), local_state
