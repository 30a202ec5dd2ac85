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
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from server._config import load_settings
from tests.deploy.prom import wait_for
from tests.helpers import find_free_port

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


@pytest.mark.process
def test_container_command_with_baked_config_becomes_healthy_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """The image's ENTRYPOINT, config and HEALTHCHECK, run as processes without Docker.

    Same environment as the image (POOL_CONFIG, POOL_HEALTH_ADDRESS) plus port
    overrides by environment, since the baked ports may be taken on this host.
    """
    runtime = stages()[-1]
    env_line = " ".join(a for k, a in runtime if k == "ENV")
    image_env = dict(re.findall(r"(\w+)=(\S+)", env_line))
    (copy,) = [a for k, a in runtime if k == "COPY" and image_env["POOL_CONFIG"] in a]
    grpc_port, metrics_port = find_free_port("0.0.0.0"), find_free_port("0.0.0.0")
    env = {
        **os.environ,
        "POOL_CONFIG": str(REPO / copy.split()[-2]),
        "POOL_HEALTH_ADDRESS": f"127.0.0.1:{grpc_port}",
        "EVENTBUS__GRPC__ADDRESS": f"0.0.0.0:{grpc_port}",
        "EVENTBUS__METRICS__ADDRESS": f"0.0.0.0:{metrics_port}",
    }
    (health,) = [a for k, a in runtime if k == "HEALTHCHECK"]
    probe_cmd = json.loads(health.split("CMD", 1)[1])
    assert probe_cmd[0] == "python"
    probe_cmd[0] = sys.executable

    def probe() -> int:
        return subprocess.run(
            probe_cmd, env=env, capture_output=True, timeout=30, check=False
        ).returncode

    log = tmp_path / "pool-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "pool-server"), "--demo"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: proc.poll() is None and probe() == 0, 30, "HEALTHCHECK passes")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert b"kafka_eventbus_actor_pool_messages_sent_total" in resp.read()
        # JSON logs (the baked config says so), one object per line on stderr.
        events = [
            json.loads(line)["event"]
            for line in log.read_text().splitlines()
            if line.startswith("{")
        ]
        assert "service.started" in events
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert probe() == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_build_stage_wheel_contains_the_service_and_passes_the_import_check(
    tmp_path: Path,
) -> None:
    # Replay the build stage's COPY lines into a clean context.
    context = tmp_path / "src"
    context.mkdir()
    patterns = dockerignore()
    for kind, args in stages()[0]:
        if kind != "COPY":
            continue
        *sources, _dest = args.split()
        for src in sources:
            path = REPO / src
            if path.is_file():
                shutil.copy2(path, context / src)
                continue
            for file in path.rglob("*"):
                rel = file.relative_to(REPO).as_posix()
                if file.is_file() and not ignored(rel, patterns):
                    (context / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, context / rel)
    wheels = tmp_path / "wheels"
    # --no-deps/--no-build-isolation: the pinned dependencies are already in
    # the test venv and the machine may be offline; the project's wheel is what
    # this repository controls.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--wheel-dir", str(wheels), str(context)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = wheels.glob("kafka_actor_pool-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(
            zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
        zf.extractall(tmp_path / "site")
    for module in (
        "pool/__init__.py",
        "server/__main__.py",
        "server/healthcheck.py",
        "clients/__init__.py",
        "actorpool/control/v1/control_pb2.py",
        "actorpool/control/v1/control_pb2_grpc.py",
    ):
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)
    assert "pool-server = server.__main__:main" in entry_points
    assert "poolctl = clients.poolctl:main" in entry_points

    # The runtime stage's smoke import, from the unpacked wheel only.
    check = (
        "import sys, pathlib\n"
        f"site = pathlib.Path({str(tmp_path / 'site')!r})\n"
        "sys.path.insert(0, str(site))\n"
        "import pool, server, clients, actorpool.control.v1.control_pb2_grpc, server.healthcheck\n"
        "for m in (pool, server, clients, actorpool, server.healthcheck):\n"
        "    assert site in pathlib.Path(m.__file__).parents, m.__file__\n"
    )
    subprocess.run(
        [sys.executable, "-c", check], check=True, cwd=tmp_path, timeout=60, capture_output=True
    )
