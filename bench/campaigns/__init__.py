"""Reliability campaigns run by ``bench/reliability.py``.

Each public module here (name not starting with ``_``) is one campaign and
exposes ``NAME: str``, ``DESCRIPTION: str`` and ``async def run(quick: bool)
-> dict`` returning a result built by :func:`bench.campaigns._harness.result`
(at least ``campaign``, ``tried``, ``amount``, ``lost``, ``reordered``,
``duplicated_or_redelivered``, ``passed``, ``seconds``, ``details``). A module
may also set ``TIMEOUT_S`` (the runner's bound for a full run; default 900)
and ``ORDER`` (an int placing it in the report; default 100).

Shared pieces: ``_harness.py`` (broker, service subprocess, producer,
read-back, accounting) and ``_handler.py`` (the handler the service runs).
"""
