"""Fetched record batches whose header names are not UTF-8 no longer stop the consumer.

Kafka defines a header name as a UTF-8 string, but brokers do not check it and
other clients (Java, librdkafka) send whatever bytes they are given. aiokafka
decodes header names strictly: one record with a bad name makes every
``getmany()`` raise ``UnicodeDecodeError`` for its whole partition, forever —
the fetch loop fails, the service exits, and a restart meets the same record
(found by the bad-input reliability campaign, ``bench/campaigns/bad_input.py``).

:func:`install` makes the consumer's fetcher read batches through
:class:`LenientMemoryRecords`: batches are sliced in Python and parsed by
aiokafka's C reader as before (the fast path: one wrapper and one list per
batch); only when the C reader fails on a header name is that batch parsed
again by aiokafka's pure-Python reader, which decodes header
names with ``backslashreplace`` (``b"\\xffname"`` becomes ``"\\\\xffname"``). The
record is then consumed like any other (its ID and envelope rules apply), and
nothing before or after it in the batch is lost or repeated.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final

import structlog
from aiokafka.consumer import fetcher as _fetcher
from aiokafka.errors import CorruptRecordException
from aiokafka.record import default_records as _default_records
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.legacy_records import LegacyRecordBatch
from aiokafka.record.memory_records import _MemoryRecordsPy

__all__ = ["LenientMemoryRecords", "install"]

log = structlog.get_logger("server.records")

_LENGTH_OFFSET: Final = struct.calcsize(">q")
_LOG_OVERHEAD: Final = struct.calcsize(">qi")
_MAGIC_OFFSET: Final = struct.calcsize(">qii")
_MIN_SLICE: Final = _MemoryRecordsPy.MIN_SLICE
_LENGTH = struct.Struct(">i")


class _LenientSlice(bytearray):
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytearray.decode(self, encoding, "backslashreplace")


class _LenientBuffer(bytearray):
    """A batch buffer whose slices decode leniently (only header names are decoded)."""

    def __getitem__(self, index: Any) -> Any:
        item = bytearray.__getitem__(self, index)
        return _LenientSlice(item) if isinstance(index, slice) else item


class _LenientBatchPy(_default_records._DefaultRecordBatchPy):  # type: ignore[misc]
    def __iter__(self) -> _LenientBatchPy:
        super().__iter__()  # decompresses into self._buffer
        self._buffer = _LenientBuffer(self._buffer)  # type: ignore[has-type]
        return self


class _FallbackBatch:
    """A C-parsed v2 batch that re-parses itself leniently if a header name is not UTF-8."""

    __slots__ = ("_batch", "_data")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._batch = DefaultRecordBatch(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._batch, name)

    def validate_crc(self) -> bool:
        return bool(self._batch.validate_crc())

    def __next__(self) -> Any:  # the fetcher reads a control batch's marker this way
        return next(self._batch)

    def __iter__(self) -> Iterator[Any]:
        return self._iter()

    def _iter(self) -> Iterator[Any]:
        done = 0
        try:
            for record in self._batch:
                yield record
                done += 1
        except UnicodeDecodeError as exc:
            log.warning(
                "consumer.header_name_not_utf8",
                base_offset=self._batch.base_offset,
                next_offset=self._batch.next_offset,
                error=str(exc),
            )
            for index, record in enumerate(_LenientBatchPy(self._data)):
                if index >= done:
                    yield record


class LenientMemoryRecords:
    """Drop-in for aiokafka's ``MemoryRecords`` (the fetched bytes of one partition)."""

    __slots__ = ("_buffer", "_next", "_pos")

    def __init__(self, data: bytes) -> None:
        self._buffer = data
        self._pos = 0
        self._next: memoryview | None = None
        self._cache_next()

    def _cache_next(self) -> None:
        buffer, pos = self._buffer, self._pos
        if len(buffer) - pos < _LOG_OVERHEAD:
            self._next = None  # a partial batch at the end: the fetcher refetches it
            return
        (length,) = _LENGTH.unpack_from(buffer, pos + _LENGTH_OFFSET)
        end = pos + _LOG_OVERHEAD + length
        if end > len(buffer):
            self._next = None
            return
        self._next = memoryview(buffer)[pos:end]
        self._pos = end

    def size_in_bytes(self) -> int:
        return len(self._buffer)

    def has_next(self) -> bool:
        return self._next is not None

    def next_batch(self) -> Any:
        data = self._next
        if data is None:
            return None
        if len(data) < _MIN_SLICE:  # as aiokafka's own reader checks
            raise CorruptRecordException(
                "Record size is less than the minimum record overhead "
                f"({_MIN_SLICE - _LOG_OVERHEAD})"
            )
        self._cache_next()
        magic = data[_MAGIC_OFFSET]
        if magic >= 2:
            return _FallbackBatch(data)
        return LegacyRecordBatch(data, magic)  # v0/v1 records have no headers


def install() -> None:
    """Make aiokafka's fetcher use :class:`LenientMemoryRecords` (idempotent)."""
    _fetcher.MemoryRecords = LenientMemoryRecords
