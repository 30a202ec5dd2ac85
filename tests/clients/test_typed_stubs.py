"""The clients call the control API through the generated, typed stubs: mypy
sees each RPC's request and response types (an ``Any`` stub would let a wrong
request or a misspelt field through ``make typecheck`` unseen)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

REPO = Path(__file__).resolve().parents[2]

SNIPPET = """
from clients import AsyncPoolControlClient, PoolControlClient

reveal_type(AsyncPoolControlClient()._stub)
reveal_type(PoolControlClient()._stub)
reveal_type(AsyncPoolControlClient()._stub.GetStatus)
"""


def test_both_clients_hold_the_typed_stub(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    config = ["--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(tmp_path / "c")]
    stdout, stderr, code = api.run([*config, str(snippet)])
    assert code == 0, stdout + stderr
    revealed = [
        line.split("Revealed type is ")[1] for line in stdout.splitlines() if "Revealed" in line
    ]
    pb = "actorpool.control.v1.control_pb2"
    assert revealed == [
        f'"{pb}_grpc.PoolControlAsyncStub"',
        f'"{pb}_grpc.PoolControlStub"',
        f'"grpc.aio.UnaryUnaryMultiCallable[{pb}.GetStatusRequest, {pb}.GetStatusResponse]"',
    ]
