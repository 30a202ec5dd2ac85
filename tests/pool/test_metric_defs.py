"""The one list of metric names and the helper every call site builds them with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from pool._metric_defs import (
    METRIC_NAMES,
    METRICS_OF,
    PREFIXES,
    Subsystem,
    metric_name,
    names_of,
)

REPO = Path(__file__).resolve().parents[2]


def test_the_helper_joins_the_subsystem_prefix_and_the_typed_name() -> None:
    assert metric_name("actor", "inbox_depth") == "kafka_eventbus_actor_pool_inbox_depth"
    assert metric_name("keyed", "messages_sent_total") == (
        "kafka_eventbus_keyed_pool_messages_sent_total"
    )
    assert metric_name("switch", "mode") == "kafka_eventbus_pool_mode"
    assert metric_name("consumer", "lag") == "kafka_eventbus_consumer_lag"
    assert metric_name("process", "asyncio_tasks") == "kafka_eventbus_process_asyncio_tasks"
    assert metric_name("fleet", "diverged") == "kafka_eventbus_fleet_diverged"
    assert metric_name("control", "grpc_calls_total") == "pool_control_grpc_calls_total"


def test_every_subsystem_has_names_and_every_name_is_unique_and_valid() -> None:
    assert set(METRICS_OF) == set(get_args(Subsystem)) == set(PREFIXES)
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))
    for subsystem in METRICS_OF:
        assert names_of(subsystem)
    for name in METRIC_NAMES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*[a-z0-9]", name), name
    # The keyed pool has no restarts: the one name it does not mirror.
    actor = {n.removeprefix(PREFIXES["actor"]) for n in names_of("actor")}
    keyed = {n.removeprefix(PREFIXES["keyed"]) for n in names_of("keyed")}
    assert actor - keyed == {"actor_restarted_total"}


def test_no_module_spells_a_metric_name_itself() -> None:
    """Names are made by ``metric_name`` only: no other source file of ``pool/`` or
    ``server/`` holds a quoted name with one of the prefixes."""
    prefixes = "|".join(map(re.escape, PREFIXES.values()))
    quoted = re.compile(rf"""["']({prefixes})""")
    offenders = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for package in ("pool", "server")
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "_metric_defs.py"
        for line in path.read_text().splitlines()
        if quoted.search(line)
    ]
    assert offenders == []


def test_the_operations_doc_has_a_row_for_every_name() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    for name in METRIC_NAMES:
        documented = name.replace(PREFIXES["keyed"], PREFIXES["actor"])
        assert re.search(rf"^\| `{re.escape(documented)}` \|", doc, re.M), name
