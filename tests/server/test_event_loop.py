"""pool-server runs on uvloop, and on asyncio's loop when asked."""

from __future__ import annotations

import asyncio

import pytest

from server.__main__ import run_loop


def loop_module() -> tuple[list[str], object]:
    seen: list[str] = []

    async def main() -> int:
        seen.append(type(asyncio.get_running_loop()).__module__)
        return 7

    return seen, main()


def test_service_loop_is_uvloop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POOL_EVENT_LOOP", raising=False)
    seen, main = loop_module()
    assert run_loop(main) == 7  # type: ignore[arg-type]
    assert seen[0].startswith("uvloop")


def test_asyncio_loop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POOL_EVENT_LOOP", "asyncio")
    seen, main = loop_module()
    assert run_loop(main) == 7  # type: ignore[arg-type]
    assert seen[0].startswith("asyncio")
