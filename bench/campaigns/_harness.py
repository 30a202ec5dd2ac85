"""What every reliability campaign needs: the broker, the real service as a
subprocess, a steady producer, the topic read back, and the accounting.

A campaign typically does::

    async with campaign_env("switch_storm") as env:          # broker + workdir
        topic = await env.topic(partitions=8)
        svc = env.service(topic)                              # python -m server
        await svc.start()
        producer = SteadyProducer(env.bootstrap, topic, partitions=8, aggregates=1000)
        stats = await producer.run(rate=5000, seconds=20)
        await env.wait_all_handled(topic, svc.record)         # or its own wait
        truth = await read_topic(env.bootstrap, topic)
        acc = account(truth, read_records(svc.record))
        ...
        return result(NAME, tried=..., amount=..., accounting=acc, ...)

The handler that runs in the service is :mod:`bench.campaigns._handler`.
Everything runs on loopback; every wait has a deadline. The service process,
the producer, the reading back and the accounting live in
:mod:`tests.support.harness` (the process tests use them too) and are
re-exported here; this module adds the campaign's environment and result.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from server._broker import EmbeddedBroker
from tests.support.harness import (
    HANDLER,
    ROOT,
    Accounting,
    Failure,
    Handled,
    ServiceProcess,
    SteadyProducer,
    TopicRecord,
    account,
    count_handled,
    ends_of,
    num,
    percentile,
    read_failures,
    read_records,
    read_timeline,
    read_topic,
    scrape_metrics,
    wait_for,
)
from tests.support.kafka import committed_offsets

__all__ = [
    "HANDLER",
    "ROOT",
    "Accounting",
    "CampaignEnv",
    "Failure",
    "Handled",
    "ServiceProcess",
    "SteadyProducer",
    "TopicRecord",
    "account",
    "campaign_env",
    "committed_offsets",
    "count_handled",
    "ends_of",
    "num",
    "percentile",
    "read_failures",
    "read_records",
    "read_timeline",
    "read_topic",
    "result",
    "scrape_metrics",
    "wait_for",
]


# ------------------------------------------------------------ environment


class CampaignEnv:
    """A fresh embedded broker and a work directory for one campaign."""

    def __init__(self, name: str, workdir: Path, broker: EmbeddedBroker) -> None:
        self.name = name
        self.workdir = workdir
        self.broker = broker
        self.services: list[ServiceProcess] = []
        self._topics = itertools.count()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap

    async def topic(self, partitions: int, *, dlq: bool = True) -> str:
        """Create a fresh topic (and its ``.dlq`` topic); returns its name."""
        name = f"{self.name}-{next(self._topics)}"
        topics = {name: partitions}
        if dlq:
            topics[f"{name}.dlq"] = 1
        await self.broker.create_topics(topics)
        return name

    def service(self, topic: str, **kwargs: Any) -> ServiceProcess:
        """A :class:`ServiceProcess` in this environment (killed at exit for sure)."""
        svc = ServiceProcess(self.bootstrap, topic, self.workdir, **kwargs)
        self.services.append(svc)
        return svc

    async def wait_handled(
        self,
        record: Path,
        truth_keys: set[tuple[int, int]],
        timeout: float,
        what: str = "every expected event handled",
    ) -> float:
        """Wait until every ``(partition, offset)`` of ``truth_keys`` is in ``record``."""

        def done() -> bool:
            handled = {(r.partition, r.offset) for r in read_records(record)}
            return truth_keys <= handled

        return await wait_for(done, timeout, what, interval=0.25)


@contextlib.asynccontextmanager
async def campaign_env(name: str, *, keep: bool | None = None) -> AsyncIterator[CampaignEnv]:
    """Broker + work directory for campaign ``name``; everything torn down at exit.

    The work directory (records, service logs, broker log) is kept when the
    campaign fails or ``keep`` (default: ``$RELIABILITY_KEEP`` set) is true.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"reliability-{name}-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log")
    await asyncio.to_thread(broker.start)
    env = CampaignEnv(name, workdir, broker)
    failed = True
    try:
        yield env
        failed = False
    finally:
        for svc in env.services:
            svc.cleanup()
        await asyncio.to_thread(broker.stop)
        if keep is None:
            keep = bool(os.environ.get("RELIABILITY_KEEP"))
        if failed or keep:
            print(f"[{name}] work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# ----------------------------------------------------------------- result


def result(
    campaign: str,
    *,
    tried: str,
    amount: str,
    accounting: Accounting | None,
    passed: bool,
    seconds: float,
    details: Mapping[str, Any],
    lost: int | None = None,
    reordered: int | None = None,
    duplicated_or_redelivered: int | None = None,
    failures: Sequence[str] = (),
) -> dict[str, Any]:
    """The result dict the runner expects. Counts default to ``accounting``'s."""
    acc = accounting or Accounting()
    out: dict[str, Any] = {
        "campaign": campaign,
        "tried": tried,
        "amount": amount,
        "lost": acc.lost if lost is None else lost,
        "reordered": (acc.reordered + acc.overlapped) if reordered is None else reordered,
        "duplicated_or_redelivered": (
            acc.duplicated if duplicated_or_redelivered is None else duplicated_or_redelivered
        ),
        "passed": bool(passed),
        "seconds": round(seconds, 1),
        "details": dict(details),
    }
    if accounting is not None:
        out["details"].setdefault("accounting", accounting.as_dict())
    if failures:
        out["failures"] = list(failures)
    return out
