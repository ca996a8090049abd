"""Per-tenant budgets and rate limits, held across every worker process of a served bento.

Each tenant (`[tenants.<name>]`, framework/spec.py) may have a daily token budget, a daily cost budget (both per
UTC day) and a request rate. The service asks before it calls the model and tells after:

    held = budgets.reserve("acme", est_tokens=prompt + max_tokens, est_cost=worst_case_cost)
    if isinstance(held, Refusal): answer 429 with held.to_dict() and `Retry-After: held.retry_after`
    try: answer = call the model
    except: budgets.release(held); raise
    budgets.settle(held, actual_tokens, actual_cost)

A reservation holds its worst case until it is settled, so however many requests run at once, what is spent
plus what is held never passes a limit: a request that might not fit is refused before the model runs. Settling
charges the actual figures and frees the rest; an actual above the estimate is charged in full (the day's
remaining may then read 0, and later requests are refused until the day turns). A reservation that is neither
settled nor released within `reservation_ttl_s` (a killed worker) is charged at its estimate.

The request rate is a sliding window: at most `requests_per_minute` admissions in any 60 s (each admission is
a row; the count is exact, with no burst of twice the rate across a minute boundary, as a fixed window allows).
A refused request is not counted, and changes nothing. A released request still counts against the rate.

State is one SQLite file (stdlib; WAL, each reserve/settle/release one `BEGIN IMMEDIATE` transaction, so workers
on one machine serialise on it; not for a network file system). Costs are kept as integers of 1e-9 of the
price currency, so sums are exact and the limit comparison cannot drift with float rounding.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from framework.errors import SpecError
from framework.spec import TenantSpec

BUDGETS_FILE = "budgets.sqlite"
COST_UNIT = 1e-9            # costs are stored as integer multiples of this (of the price currency)
WINDOW_S = 60.0             # the request-rate window
IN_FLIGHT_RETRY_S = 2.0     # Retry-After when only reservations of running requests are in the way

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spent (
    tenant TEXT NOT NULL, day TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0, cost INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day));
CREATE TABLE IF NOT EXISTS held (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, day TEXT NOT NULL,
    tokens INTEGER NOT NULL, cost INTEGER NOT NULL, at REAL NOT NULL,
    expired INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS held_by_tenant ON held (tenant, day);
CREATE TABLE IF NOT EXISTS admitted (tenant TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS admitted_by_tenant ON admitted (tenant, at);
"""


def budgets_path(state_dir: Path) -> Path:
    """The budgets file in a project's state folder, beside `traces/` (`Project.state_dir`)."""
    return state_dir / BUDGETS_FILE


@dataclass(frozen=True)
class Reservation:
    """What `reserve` holds for one request: `tokens` and `cost` (currency) on `day` (UTC, ISO date)."""

    id: str
    tenant: str
    day: str
    tokens: int
    cost: float
    at: float


@dataclass(frozen=True)
class Refusal:
    """Why a request may not run now (HTTP 429): which limit, its value, what is used of it (spent plus held
    by running requests), what the request asked for, and the seconds until it may fit again."""

    tenant: str
    limit: str                 # "requests_per_minute", "daily_tokens" or "daily_cost"
    value: float
    used: float
    requested: float
    retry_after_s: float
    status: int = 429

    @property
    def retry_after(self) -> int:
        """For the `Retry-After` header: whole seconds, at least 1."""
        return max(1, math.ceil(self.retry_after_s))

    @property
    def message(self) -> str:
        unit = {"requests_per_minute": "requests in the last 60 s", "daily_tokens": "tokens today (UTC)",
                "daily_cost": "cost today (UTC)"}[self.limit]
        return (f"tenant {self.tenant!r} is at its {self.limit} limit: {self.used:g} of {self.value:g} {unit}, "
                f"this request needs {self.requested:g}; retry in {self.retry_after} s")

    def to_dict(self) -> dict[str, Any]:
        """The 429 body."""
        return {"error": "rate-limited" if self.limit == "requests_per_minute" else "budget-exhausted",
                "message": self.message, **{k: v for k, v in asdict(self).items() if k != "status"},
                "retry_after": self.retry_after}


@dataclass(frozen=True)
class Usage:
    """A tenant's state today: spent (settled), held (reserved by running requests), remaining (never < 0)."""

    tenant: str
    day: str
    tokens_spent: int
    tokens_held: int
    cost_spent: float
    cost_held: float
    requests_last_minute: int
    daily_tokens: int | None
    daily_cost: float | None
    requests_per_minute: int | None
    tokens_remaining: int | None
    cost_remaining: float | None
    resets_in_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _units(cost: float) -> int:
    """A cost in integer units, rounded up (a budget is never undercharged by rounding)."""
    if not math.isfinite(cost) or cost < 0 or cost > 1e9:
        raise ValueError(f"a cost must be a finite number from 0 to 1e9, got {cost!r}")
    return math.ceil(round(cost / COST_UNIT, 3))


def _day(now: float) -> tuple[str, float]:
    """(UTC date, seconds until it ends) for an epoch time."""
    moment = datetime.fromtimestamp(now, UTC)
    end = datetime.combine(moment.date() + timedelta(days=1), datetime.min.time(), UTC)
    return moment.date().isoformat(), end.timestamp() - now


class Budgets:
    """The budgets of a project's tenants in one SQLite file; safe to use from many threads and processes.

    `path` is the SQLite file (created, with its folder, when missing); `tenants` the `[tenants.*]` tables;
    `clock` the time in epoch seconds (tests move it); `reservation_ttl_s` how long a reservation may stay
    open before it is charged at its estimate (keep it above `[serve] timeout_s`).
    """

    def __init__(self, path: Path, tenants: Mapping[str, TenantSpec], *, clock: Callable[[], float] = time.time,
                 reservation_ttl_s: float = 3600.0):
        self.path = Path(path)
        self.tenants = dict(tenants)
        self.clock = clock
        self.reservation_ttl_s = reservation_ttl_s
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction():
            pass   # creates the file and its schema now, not on the first request

    # -- the four operations -------------------------------------------------------------------------------------
    def reserve(self, tenant: str, est_tokens: int, est_cost: float) -> Reservation | Refusal:
        """Hold a request's worst case (tokens and cost) and count it against the rate, or say which limit it
        would pass. A refusal changes nothing."""
        limits = self._limits(tenant)
        if isinstance(est_tokens, bool) or not isinstance(est_tokens, int) or est_tokens < 0:
            raise ValueError(f"est_tokens must be an int >= 0, got {est_tokens!r}")
        cost = _units(est_cost)
        now = self.clock()
        day, day_left = _day(now)
        with self._transaction() as tx:
            db = tx.db
            self._expire(db, tenant, now)
            db.execute("DELETE FROM admitted WHERE tenant = ? AND at <= ?", (tenant, now - WINDOW_S))
            if limits.requests_per_minute is not None:
                (recent,) = db.execute("SELECT COUNT(*) FROM admitted WHERE tenant = ?", (tenant,)).fetchone()
                if recent >= limits.requests_per_minute:
                    tx.keep = False
                    (oldest,) = db.execute("SELECT at FROM admitted WHERE tenant = ? ORDER BY at LIMIT 1 OFFSET ?",
                                           (tenant, recent - limits.requests_per_minute)).fetchone()
                    return Refusal(tenant, "requests_per_minute", limits.requests_per_minute, recent, 1,
                                   max(oldest + WINDOW_S - now, 0.001))
            spent_tokens, spent_cost, held_tokens, held_cost = self._today(db, tenant, day)
            for name, limit, spent, held, asked, scale in (
                    ("daily_tokens", limits.daily_tokens, spent_tokens, held_tokens, est_tokens, 1),
                    ("daily_cost", None if limits.daily_cost is None else math.floor(
                        round(limits.daily_cost / COST_UNIT, 3)), spent_cost, held_cost, cost, COST_UNIT)):
                if limit is not None and spent + held + asked > limit:
                    tx.keep = False   # a refusal changes nothing, housekeeping included
                    wait = IN_FLIGHT_RETRY_S if spent + asked <= limit else day_left
                    return Refusal(tenant, name, _out(limit, scale), _out(spent + held, scale), _out(asked, scale),
                                   wait)
            reservation = Reservation(uuid.uuid4().hex, tenant, day, est_tokens, _currency(cost), now)
            db.execute("INSERT INTO held (id, tenant, day, tokens, cost, at) VALUES (?, ?, ?, ?, ?, ?)",
                       (reservation.id, tenant, day, est_tokens, cost, now))
            db.execute("INSERT INTO admitted (tenant, at) VALUES (?, ?)", (tenant, now))
        return reservation

    def settle(self, reservation: Reservation, actual_tokens: int, actual_cost: float) -> bool:
        """Charge what the request used and free the rest of its reservation (to the reservation's day).
        An actual above the estimate is charged in full. False when it was settled or released already
        (nothing changes); a reservation already charged at its estimate (expired) is charged the excess."""
        if isinstance(actual_tokens, bool) or not isinstance(actual_tokens, int) or actual_tokens < 0:
            raise ValueError(f"actual_tokens must be an int >= 0, got {actual_tokens!r}")
        cost = _units(actual_cost)
        with self._transaction() as tx:
            db = tx.db
            row = db.execute("SELECT tokens, cost, expired FROM held WHERE id = ?", (reservation.id,)).fetchone()
            if row is None:
                return False
            held_tokens, held_cost, expired = row
            db.execute("DELETE FROM held WHERE id = ?", (reservation.id,))
            if expired:
                actual_tokens, cost = max(0, actual_tokens - held_tokens), max(0, cost - held_cost)
            self._charge(db, reservation.tenant, reservation.day, actual_tokens, cost)
        return True

    def release(self, reservation: Reservation) -> bool:
        """Free a reservation without charging it (the request failed before using the model). False when it
        was settled or released already; one already charged at its estimate (expired) stays charged."""
        with self._transaction() as tx:
            return tx.db.execute("DELETE FROM held WHERE id = ?", (reservation.id,)).rowcount > 0

    def usage(self, tenant: str) -> Usage:
        """The tenant's day so far, read in one consistent snapshot."""
        limits = self._limits(tenant)
        now = self.clock()
        day, day_left = _day(now)
        with self._transaction(write=False) as tx:
            db = tx.db
            spent_tokens, spent_cost, held_tokens, held_cost = self._today(db, tenant, day)
            (recent,) = db.execute("SELECT COUNT(*) FROM admitted WHERE tenant = ? AND at > ?",
                                   (tenant, now - WINDOW_S)).fetchone()
        cost_limit = None if limits.daily_cost is None else math.floor(round(limits.daily_cost / COST_UNIT, 3))
        return Usage(
            tenant=tenant, day=day, tokens_spent=spent_tokens, tokens_held=held_tokens,
            cost_spent=_currency(spent_cost), cost_held=_currency(held_cost), requests_last_minute=recent,
            daily_tokens=limits.daily_tokens, daily_cost=limits.daily_cost,
            requests_per_minute=limits.requests_per_minute,
            tokens_remaining=None if limits.daily_tokens is None else max(
                0, limits.daily_tokens - spent_tokens - held_tokens),
            cost_remaining=None if cost_limit is None else _currency(max(0, cost_limit - spent_cost - held_cost)),
            resets_in_s=day_left)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread or process ends)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- inside ----------------------------------------------------------------------------------------------------
    def _limits(self, tenant: str) -> TenantSpec:
        limits = self.tenants.get(tenant)
        if limits is None:
            raise SpecError(f"no tenant {tenant!r}; declared: {', '.join(sorted(self.tenants)) or 'none'}",
                            field=f"tenants.{tenant}")
        return limits

    def _connection(self) -> sqlite3.Connection:
        # One connection per thread and process: sqlite3 connections are not shared across threads, and one
        # inherited through fork() must not be used by the child.
        db, pid = getattr(self._local, "db", None), getattr(self._local, "pid", None)
        if db is None or pid != os.getpid():
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            _prepare(db)
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def _transaction(self, write: bool = True):
        return _Transaction(self._connection(), write)

    @staticmethod
    def _today(db: sqlite3.Connection, tenant: str, day: str) -> tuple[int, int, int, int]:
        """(tokens spent, cost spent, tokens held, cost held) on `day`; cost in units. A reservation past its
        TTL counts as held until `_expire` charges it: the sum is the same either way."""
        spent = db.execute("SELECT tokens, cost FROM spent WHERE tenant = ? AND day = ?", (tenant, day)).fetchone()
        spent_tokens, spent_cost = spent or (0, 0)
        held_tokens, held_cost = db.execute("SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM held "
                                            "WHERE tenant = ? AND day = ? AND expired = 0", (tenant, day)).fetchone()
        return spent_tokens, spent_cost, held_tokens, held_cost

    def _expire(self, db: sqlite3.Connection, tenant: str, now: float) -> None:
        """Charge reservations older than the TTL at their estimate (their worker died, or never said)."""
        stale = db.execute("SELECT id, day, tokens, cost FROM held WHERE tenant = ? AND expired = 0 AND at < ?",
                           (tenant, now - self.reservation_ttl_s)).fetchall()
        for reservation_id, day, tokens, cost in stale:
            self._charge(db, tenant, day, tokens, cost)
            db.execute("UPDATE held SET expired = 1 WHERE id = ?", (reservation_id,))
        db.execute("DELETE FROM held WHERE tenant = ? AND expired = 1 AND at < ?", (tenant, now - 2 * 86400))
        db.execute("DELETE FROM spent WHERE tenant = ? AND day < ?",
                   (tenant, (datetime.fromtimestamp(now, UTC).date() - timedelta(days=7)).isoformat()))

    @staticmethod
    def _charge(db: sqlite3.Connection, tenant: str, day: str, tokens: int, cost: int) -> None:
        db.execute("INSERT INTO spent (tenant, day, tokens, cost) VALUES (?, ?, ?, ?) ON CONFLICT (tenant, day) "
                   "DO UPDATE SET tokens = tokens + excluded.tokens, cost = cost + excluded.cost",
                   (tenant, day, tokens, cost))


def _prepare(db: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """WAL mode and the schema. Switching a new file to WAL needs a lock that SQLite does not wait for (its
    busy timeout does not apply), so workers opening a fresh file together retry here."""
    import random

    db.execute("PRAGMA synchronous=NORMAL")   # under WAL: a crashed process loses nothing; an OS crash may lose
    deadline = time.monotonic() + wait_s      # the last commits (a little spend goes uncounted)
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


def _out(value: int, scale: float) -> float:
    return value if scale == 1 else _currency(value)


def _currency(units: int) -> float:
    return round(units * COST_UNIT, 9)


class _Transaction:
    """`BEGIN IMMEDIATE` (write: takes the database's write lock now, so the check and the write that follows
    it are one step for every process) or `BEGIN` (a read snapshot); commits on success unless `keep` was set
    False, rolls back on error."""

    def __init__(self, db: sqlite3.Connection, write: bool):
        self.db, self.write, self.keep = db, write, True

    def __enter__(self) -> _Transaction:
        self.db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.db.execute("COMMIT" if kind is None and self.keep else "ROLLBACK")
