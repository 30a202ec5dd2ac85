"""The supervised actor pool.

Each actor owns an inbox (bounded), its own handler instance (its state, built
by an optional factory) and a restart budget. When the handler raises, the
actor has crashed: its supervisor counts a restart, rebuilds the actor's state,
and retries the event that crashed it after a backoff, during which the actor
serves its other aggregates while the crashing aggregate's later events wait
behind it, in order. When the retry policy gives up the event
becomes a dead letter.

The restart budget detects a crash loop. The retry policy bounds how often
one event may crash the actor; the budget bounds how many *events* in a row
may crash it: each event's first crash is charged, within a sliding window,
and an event handled successfully makes the budget whole again. When it is
spent (event after event crashes the actor and none is handled) the
supervisor escalates: each newly crashing event is a dead letter at once
(``restart-budget-exhausted``) with its metric, and one WARNING log marks the
start of the streak. The actor goes on serving its other aggregates. A
handler that fails on some events among successes (a failure rate, not a
loop) does not spend the budget: each failing event gets the whole retry
policy, as in the keyed pool. Nothing a handler does can stop the process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import structlog

from pool._executor import BasePool, _Executor
from pool._message import Message
from pool._metrics import PoolMetrics
from pool._options import ActorPoolOptions
from pool._protocol import Handler, PoolMode
from pool._retry import RestartBudget

log = structlog.get_logger("pool")

#: Builds the handler (and so the state) of actor ``index``; called at start and
#: at every restart.
ActorFactory = Callable[[int], Handler]

_DEFAULTS = ActorPoolOptions()


class _Actor:
    """What the supervisor keeps per actor besides its inbox."""

    __slots__ = ("budget", "escalating", "handled_at_crash", "handler", "restarts")

    def __init__(self, handler: Handler, budget: RestartBudget) -> None:
        self.handler = handler
        self.budget = budget
        self.restarts = 0
        # Events the actor had handled at its last crash: more now means it
        # made progress since, and the budget is whole again.
        self.handled_at_crash = 0
        # The budget is spent: crashes are dead-lettered at once (logged once).
        self.escalating = False


class ActorPool(BasePool):
    """N supervised actors with bounded inboxes; see the module docstring.

    Built as ``ActorPool(handler, ActorPoolOptions(size=..., capacity=...,
    max_restarts=...), metrics=...)``: ``options.capacity`` bounds each inbox.
    """

    _mode = PoolMode.ACTOR
    options: ActorPoolOptions

    def __init__(
        self,
        handler: Handler | None = None,
        options: ActorPoolOptions = _DEFAULTS,
        *,
        actor_factory: ActorFactory | None = None,
        metrics: PoolMetrics | None = None,
        thread_pool: ThreadPoolExecutor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``actor_factory(index)`` builds each actor's handler (its state), at
        start and at every restart; without it every actor runs ``handler``.
        The other keywords are :class:`BasePool`'s."""
        if handler is None and actor_factory is None:
            raise TypeError("ActorPool needs a handler or an actor_factory")
        self._factory = actor_factory
        first = handler if handler is not None else _unused
        super().__init__(
            first,
            options,
            metrics=metrics,
            thread_pool=thread_pool,
            clock=clock,
            wall_clock=wall_clock,
            rand=rand,
        )
        max_restarts, restart_window = options.max_restarts, options.restart_window
        self._actors: list[_Actor] = []
        for ex in self._executors:
            h = first
            if actor_factory is not None:
                h = actor_factory(ex.index)
                self._use_handler(ex, h)
            self._actors.append(_Actor(h, RestartBudget(max_restarts, restart_window)))

    @property
    def restarts(self) -> int:
        """Restarts of all actors since the pool started."""
        return sum(a.restarts for a in self._actors)

    def actor_restarts(self, index: int) -> int:
        return self._actors[index].restarts

    def _on_crash(self, ex: _Executor, error: BaseException, attempts: int) -> bool:
        """The supervisor: count the restart, rebuild the actor's state; False = escalate.

        Only an event's first crash is charged to the budget: the retry policy
        bounds how often one event may crash the actor, the budget how many
        events in a row may crash it without one handled in between.
        """
        index = ex.index
        actor = self._actors[index]
        actor.restarts += 1
        self._metrics.actor_restarted(index)
        if self._factory is not None:
            try:
                handler = self._factory(index)
            except Exception:
                log.exception("pool.actor_factory_failed", executor=index)
            else:
                actor.handler = handler
                self._use_handler(ex, handler)
        if attempts > 1:
            return True
        now = self._clock()
        budget = actor.budget
        handled = ex.ok
        if handled != actor.handled_at_crash:  # progress since the last crash
            actor.handled_at_crash = handled
            budget.reset()
        allowed = budget.try_restart(now)
        # DEBUG per restart (a poison storm must not flood the log); one WARNING
        # when the actor starts escalating (each dead letter is logged anyway).
        starts_escalating = not allowed and not actor.escalating
        actor.escalating = not allowed
        (log.warning if starts_escalating else log.debug)(
            "pool.actor_escalating" if starts_escalating else "pool.actor_restarted",
            executor=index,
            error_type=type(error).__qualname__,
            charged=budget.used(now),
            budget=budget.max_restarts,
            window_s=budget.window,
            escalated=not allowed,
        )
        return allowed


async def _unused(
    message: Message,
) -> None:  # pragma: no cover - placeholder when a factory is given
    raise AssertionError("actor handlers come from the factory")
