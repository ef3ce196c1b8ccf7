"""The one rate limiter of the project: token buckets keyed by source, in a bounded table.

Sans-IO: nothing here reads a clock; every call takes ``now`` (seconds, any monotonic origin), so the
limiter runs the same under asyncio, in the simulator and in unit tests with a fake clock.

It is a stdlib-only leaf so both halves of the project can use it without breaking the layering rule
(the SIP stack and ``overlay`` never import each other): the overlay limits stores, lookups and join
attempts per source on its port, the SIP side limits registrations, scans and guesses. One mechanism, one
config syntax (:meth:`Rate.parse`), one set of counters (:meth:`RateLimiter.stats`).

Why a bounded table: sources are whatever the attacker says they are (a spoofed UDP address, a fresh
NodeId per packet), so the table of buckets must not grow with them. It is an LRU of at most ``max_keys``
buckets; evicting the least recently used one costs nothing that matters, since an idle bucket refills to
full anyway, and a spoofing flood only ever evicts its own (or idle) buckets.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

__all__ = ["UNLIMITED", "Rate", "RateLimiter", "TokenBuckets"]

_RATE_RE = re.compile(
    r"^\s*(?P<n>\d+(?:\.\d+)?)\s*/\s*(?P<unit>s|sec|second|m|min|minute|h|hour)\s*"
    r"(?::\s*(?P<burst>\d+(?:\.\d+)?))?\s*$"
)
_UNIT_SECONDS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


@dataclass(frozen=True)
class Rate:
    """A sustained rate (tokens per second) and a burst (bucket size, in tokens).

    ``per_second`` of ``math.inf`` means unlimited: every call is allowed and no bucket is kept.
    """

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_second > 0) or math.isnan(self.per_second):
            raise ValueError(f"rate must be positive, got {self.per_second!r}")
        if not (self.burst >= 1) or math.isnan(self.burst):
            raise ValueError(f"burst must be at least 1, got {self.burst!r}")

    @property
    def unlimited(self) -> bool:
        return math.isinf(self.per_second)

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Read ``"N/s"``, ``"N/min"``, ``"N/h"``, optionally ``":BURST"`` (``"20/s:50"``), or ``"off"``.

        Without a burst the bucket holds one second's worth (at least 1), so ``"20/s"`` allows 20 at once.
        Raises ``ValueError`` with a message fit for a one-line CLI error.
        """
        if text.strip().lower() in ("off", "unlimited", "none", "inf"):
            return UNLIMITED
        m = _RATE_RE.match(text)
        if m is None:
            raise ValueError(
                f"bad rate {text!r}: expected N/s, N/min or N/h, optionally :BURST (e.g. 20/s:50), or off"
            )
        per_second = float(m["n"]) / _UNIT_SECONDS[m["unit"]]
        if per_second <= 0:
            raise ValueError(f"bad rate {text!r}: must be positive (use 'off' for no limit)")
        burst = float(m["burst"]) if m["burst"] else max(1.0, per_second)
        if burst < 1:
            raise ValueError(f"bad rate {text!r}: burst must be at least 1")
        return cls(per_second, burst)

    def __str__(self) -> str:
        if self.unlimited:
            return "off"
        return f"{self.per_second:g}/s:{self.burst:g}"


UNLIMITED = Rate(math.inf, math.inf)


class TokenBuckets:
    """Token buckets for one kind of action, one bucket per source key, at most ``max_keys`` of them.

    A bucket starts full (``rate.burst`` tokens) and refills at ``rate.per_second``; an action costing
    ``cost`` tokens is allowed when the bucket holds that many.  Time going backwards is treated as no time.
    """

    __slots__ = ("_buckets", "evictions", "max_keys", "rate")

    def __init__(self, rate: Rate, max_keys: int = 4096) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.max_keys = max_keys
        # key -> [tokens, time of last update]; most recently used last.
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, key: Hashable, now: float) -> list[float]:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
                self.evictions += 1
            bucket = [self.rate.burst, now]
            self._buckets[key] = bucket
            return bucket
        self._buckets.move_to_end(key)
        elapsed = now - bucket[1]
        if elapsed > 0:
            bucket[0] = min(self.rate.burst, bucket[0] + elapsed * self.rate.per_second)
            bucket[1] = now
        return bucket

    def allow(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them; say whether it did."""
        if self.rate.unlimited:
            return True
        bucket = self._bucket(key, now)
        if bucket[0] >= cost:
            bucket[0] -= cost
            return True
        return False

    def wait(self, key: Hashable, now: float, cost: float = 1.0) -> float:
        """Seconds until ``allow(key, ..., cost)`` would succeed (0 if now); takes nothing."""
        if self.rate.unlimited:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0 if cost <= self.rate.burst else math.inf
        tokens = min(self.rate.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate.per_second)
        if tokens >= cost:
            return 0.0
        if cost > self.rate.burst:
            return math.inf
        return (cost - tokens) / self.rate.per_second

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s bucket (it starts full next time)."""
        self._buckets.pop(key, None)


class RateLimiter:
    """Several kinds of action ("store", "lookup", "join", "register", ...), each with its own rate and
    bucket table, and counters of what was allowed and refused per kind.

    A kind not configured is unlimited (allowed and counted), so callers can name every action they
    check and deployments choose which ones to limit.
    """

    def __init__(self, rates: Mapping[str, Rate] | None = None, max_keys: int = 4096) -> None:
        self.max_keys = max_keys
        self._tables: dict[str, TokenBuckets] = {}
        self.allowed: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        for kind, rate in (rates or {}).items():
            self.set_rate(kind, rate)

    def set_rate(self, kind: str, rate: Rate) -> None:
        """(Re)configure one kind; its buckets start over."""
        self._tables[kind] = TokenBuckets(rate, self.max_keys)

    def rate(self, kind: str) -> Rate:
        table = self._tables.get(kind)
        return table.rate if table is not None else UNLIMITED

    def allow(self, kind: str, key: Hashable, now: float, cost: float = 1.0) -> bool:
        """Whether ``key`` may do one more ``kind`` action now (and charge it if so); counted either way."""
        table = self._tables.get(kind)
        ok = table is None or table.allow(key, now, cost)
        counter = self.allowed if ok else self.refused
        counter[kind] = counter.get(kind, 0) + 1
        return ok

    def wait(self, kind: str, key: Hashable, now: float, cost: float = 1.0) -> float:
        """Seconds until ``key`` may do a ``kind`` action (0 if now); charges nothing, counts nothing."""
        table = self._tables.get(kind)
        return 0.0 if table is None else table.wait(key, now, cost)

    def forget(self, key: Hashable) -> None:
        """Drop ``key``'s buckets of every kind."""
        for table in self._tables.values():
            table.forget(key)

    def keys(self) -> int:
        """Buckets held, over all kinds (bounded by ``max_keys`` per kind)."""
        return sum(len(table) for table in self._tables.values())

    def stats(self) -> dict[str, dict[str, object]]:
        """Per kind: its rate, allowed and refused counts, buckets held, evictions (for ``status``)."""
        kinds = set(self._tables) | set(self.allowed) | set(self.refused)
        out: dict[str, dict[str, object]] = {}
        for kind in sorted(kinds):
            table = self._tables.get(kind)
            out[kind] = {
                "rate": str(table.rate if table is not None else UNLIMITED),
                "allowed": self.allowed.get(kind, 0),
                "refused": self.refused.get(kind, 0),
                "keys": len(table) if table is not None else 0,
                "evictions": table.evictions if table is not None else 0,
            }
        return out
