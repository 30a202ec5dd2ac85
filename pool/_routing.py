"""Stable routing of aggregate IDs to executor indexes.

FNV-1a 32-bit over the UTF-8 bytes of the aggregate ID, modulo the pool size:
the same mapping as the Go original, so an aggregate lands on the same executor
index in both systems. Never Python's ``hash()``, which is randomised per
process.
"""

from __future__ import annotations

FNV32_OFFSET_BASIS = 2166136261
FNV32_PRIME = 16777619
_MASK32 = 0xFFFFFFFF


def fnv1a_32(data: bytes) -> int:
    """FNV-1a 32-bit hash of ``data``."""
    h = FNV32_OFFSET_BASIS
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & _MASK32
    return h


def executor_index(aggregate_id: str, size: int) -> int:
    """Executor index for ``aggregate_id`` in a pool of ``size`` executors."""
    if size <= 0:
        raise ValueError(f"pool size must be positive, got {size}")
    return fnv1a_32(aggregate_id.encode("utf-8")) % size


class Router:
    """Executor index lookup with a bounded memo.

    Hashing in pure Python costs about a microsecond per ten characters; hot
    aggregates repeat, so a memo pays for itself. The memo is cleared when it
    reaches ``memo_size`` entries, which keeps memory bounded without LRU
    bookkeeping on the hot path. ``memo`` may be read directly by hot paths
    (a hit is a plain dict lookup); it is never replaced, only cleared.
    """

    __slots__ = ("_memo_size", "memo", "size")

    def __init__(self, size: int, memo_size: int = 65536) -> None:
        if size <= 0:
            raise ValueError(f"pool size must be positive, got {size}")
        self.size = size
        self.memo: dict[str, int] = {}
        self._memo_size = memo_size

    def __call__(self, aggregate_id: str) -> int:
        index = self.memo.get(aggregate_id)
        if index is None:
            index = fnv1a_32(aggregate_id.encode("utf-8")) % self.size
            if len(self.memo) >= self._memo_size:
                self.memo.clear()
            self.memo[aggregate_id] = index
        return index
