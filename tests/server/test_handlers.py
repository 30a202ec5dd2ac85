"""Handler plug-in loading and the demo handler shipped with the service."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from pathlib import Path

import pytest

from pool import Message, NonRetryableError
from server import demo
from server._config import load_settings
from server._handlers import HandlerLoadError, load_handler
from server._intake import Decoder


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package ``plugpkg_<n>`` on sys.path with handlers good and bad."""
    name = f"plugpkg_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(
        "seen = []\n"
        "async def handle(message):\n    seen.append(message)\n"
        "def sync_handle(message):\n    seen.append(message)\n"
        "class Holder:\n    @staticmethod\n    def nested(message):\n        pass\n"
        "NOT_CALLABLE = 42\n"
        "def two_args(a, b):\n    pass\n"
    )
    (pkg / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    (pkg / "needs_dep.py").write_text("import surely_not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_loads_async_and_sync_and_nested_callables(plugins: str) -> None:
    handler = load_handler(f"{plugins}.good:handle")
    assert inspect.iscoroutinefunction(handler)
    assert not inspect.iscoroutinefunction(load_handler(f"{plugins}.good:sync_handle"))
    assert callable(load_handler(f"{plugins}.good:Holder.nested"))


def test_default_handler_path_loads() -> None:
    assert load_handler("server.demo:handle") is demo.handle


@pytest.mark.parametrize(
    ("path", "problem", "fragment"),
    [
        ("no_colon_here", "syntax", "must be 'package.module:callable'"),
        (":handle", "syntax", "must be"),
        ("surely_missing_module_abc:handle", "module-not-found", "not found"),
        ("{pkg}.missing:handle", "module-not-found", "module '{pkg}.missing' not found"),
        ("{pkg}.needs_dep:handle", "import-failed", "surely_not_installed_dep_xyz"),
        ("{pkg}.broken:handle", "import-failed", "RuntimeError: boom at import"),
        ("{pkg}.good:nope", "attribute-missing", "has no attribute 'nope'"),
        ("{pkg}.good:Holder.nope", "attribute-missing", "has no attribute 'nope'"),
        ("{pkg}.good:NOT_CALLABLE", "not-callable", "is a int, not callable"),
        ("{pkg}.good:two_args", "bad-signature", "cannot be called with one argument"),
    ],
)
def test_load_errors_are_clear(plugins: str, path: str, problem: str, fragment: str) -> None:
    path = path.format(pkg=plugins)
    with pytest.raises(HandlerLoadError) as info:
        load_handler(path)
    assert info.value.problem == problem
    assert info.value.path == path
    assert fragment.format(pkg=plugins) in str(info.value)
    assert str(info.value).startswith(f"handler {path!r}: ")


def message(value: bytes, offset: int = 0) -> Message:
    result = Decoder().decode("demo", 0, offset, b"agg-1", value, (), 0)
    assert isinstance(result, Message)
    return result


def test_make_demo_event_is_a_valid_envelope() -> None:
    raw = demo.make_demo_event("agg-1", 5, payload={"x": 1})
    doc = json.loads(raw)
    assert doc["event_id"] == "agg-1:5"
    assert doc["aggregate_id"] == "agg-1"
    assert doc["event_version"] == 1
    assert doc["payload"] == {"seq": 5, "x": 1}
    msg = message(raw)
    assert msg.aggregate_id == "agg-1"
    assert msg.envelope == doc


async def test_demo_handler_latency_is_simulated() -> None:
    handler = demo.make_demo_handler(latency_ms=30)
    start = time.monotonic()
    await asyncio.gather(*(handler(message(demo.make_demo_event("a", i))) for i in range(5)))
    took = time.monotonic() - start
    assert 0.03 <= took < 1.0  # concurrent awaits: ~one latency, not five
    assert handler.handled == 5


async def test_demo_handler_failure_rate_with_seed_is_reproducible() -> None:
    async def run(seed: int) -> list[bool]:
        handler = demo.make_demo_handler(latency_ms=0, failure_rate=0.3, seed=seed)
        outcomes = []
        for i in range(200):
            try:
                await handler(message(demo.make_demo_event("a", i)))
                outcomes.append(True)
            except demo.DemoHandlerError:
                outcomes.append(False)
        assert handler.failed == outcomes.count(False)
        return outcomes

    first = await run(7)
    assert first == await run(7)
    assert 30 <= first.count(False) <= 90  # ~60 expected
    never = demo.make_demo_handler(latency_ms=0, failure_rate=0.0)
    for i in range(50):
        await never(message(demo.make_demo_event("a", i)))
    always = demo.make_demo_handler(latency_ms=0, failure_rate=1.0)
    with pytest.raises(demo.DemoHandlerError):
        await always(message(demo.make_demo_event("a", 0)))


async def test_demo_events_can_ask_for_failures() -> None:
    handler = demo.make_demo_handler(latency_ms=0)
    with pytest.raises(demo.DemoHandlerError, match="poison"):
        await handler(message(demo.make_demo_event("a", 1, fail="always")))
    with pytest.raises(NonRetryableError):
        await handler(message(demo.make_demo_event("a", 2, fail="non-retryable")))
    await handler(message(b"not an envelope"))  # plain values are handled
    assert handler.failed == 2
    assert handler.handled == 1


def test_demo_handler_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        demo.make_demo_handler(failure_rate=1.5)
    with pytest.raises(ValueError, match="latency_ms"):
        demo.make_demo_handler(latency_ms=-1)


async def test_module_handle_uses_configured_settings() -> None:
    settings = load_settings(["--set", "demo.latencyMs=0", "--set", "demo.failureRate=1"], {})
    configured = demo.configure(settings)
    try:
        assert demo.default_handler() is configured
        with pytest.raises(demo.DemoHandlerError):
            await demo.handle(message(demo.make_demo_event("a", 1)))
        assert configured.failed == 1
        demo.configure(latency_ms=0, failure_rate=0)
        await demo.handle(message(demo.make_demo_event("a", 2)))
    finally:
        demo.configure(latency_ms=1.0, failure_rate=0.0)


def test_module_handle_reads_env_until_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_default", None)
    monkeypatch.setenv("EVENTBUS__DEMO__LATENCY_MS", "7")
    monkeypatch.setenv("EVENTBUS__DEMO__FAILURE_RATE", "0.25")
    handler = demo.default_handler()
    assert handler.latency_s == pytest.approx(0.007)
    assert handler.failure_rate == 0.25
    assert demo.default_handler() is handler
