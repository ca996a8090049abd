"""Tenant budgets and rate limits (framework/budgets.py): a model-checked state machine on a fake clock, and
property tests that many threads and several processes sharing one SQLite file can never overspend."""

from __future__ import annotations

import multiprocessing
import sqlite3
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from framework.budgets import COST_UNIT, Budgets, Refusal, Reservation, _units, budgets_path
from framework.errors import SpecError
from framework.spec import TenantSpec

NOON = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
TENANTS = {"acme": TenantSpec(requests_per_minute=3, daily_tokens=1000, daily_cost=0.001),
           "trial": TenantSpec(daily_tokens=100), "free": TenantSpec()}


class Clock:
    def __init__(self, now: float = NOON):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def budgets(tmp_path, clock):
    return Budgets(budgets_path(tmp_path / ".slipway"), TENANTS, clock=clock)


def test_reserve_settle_release_and_usage(budgets, clock):
    held = budgets.reserve("acme", 300, 0.0002)
    assert isinstance(held, Reservation) and (held.tenant, held.day, held.tokens) == ("acme", "2026-11-26", 300)
    usage = budgets.usage("acme")
    assert (usage.tokens_spent, usage.tokens_held, usage.tokens_remaining) == (0, 300, 700)
    assert usage.cost_held == pytest.approx(0.0002) and usage.requests_last_minute == 1
    assert budgets.settle(held, 120, 0.00005) is True
    usage = budgets.usage("acme")
    assert (usage.tokens_spent, usage.tokens_held, usage.tokens_remaining) == (120, 0, 880)
    assert usage.cost_spent == pytest.approx(0.00005) and usage.cost_remaining == pytest.approx(0.00095)
    assert budgets.settle(held, 120, 0.00005) is False          # settled once only
    other = budgets.reserve("acme", 500, 0.0)
    assert budgets.release(other) is True and budgets.release(other) is False
    assert budgets.usage("acme").tokens_spent == 120 and budgets.usage("acme").tokens_held == 0
    assert budgets.usage("acme").requests_last_minute == 2      # a released request still counted


def test_a_refusal_names_the_limit_what_is_used_and_when_it_resets(budgets, clock):
    first = budgets.reserve("acme", 600, 0.0)
    refusal = budgets.reserve("acme", 500, 0.0)
    assert isinstance(refusal, Refusal) and refusal.status == 429
    assert (refusal.limit, refusal.value, refusal.used, refusal.requested) == ("daily_tokens", 1000, 600, 500)
    assert refusal.retry_after == 2        # only a running request's reservation is in the way
    body = refusal.to_dict()
    assert body["error"] == "budget-exhausted" and "daily_tokens limit: 600 of 1000" in body["message"]
    budgets.settle(first, 600, 0.0)
    refusal = budgets.reserve("acme", 500, 0.0)
    assert refusal.retry_after_s == 12 * 3600     # spent: nothing frees up before midnight UTC
    cost = budgets.reserve("acme", 1, 0.0011)
    assert (cost.limit, cost.value, cost.requested) == ("daily_cost", 0.001, 0.0011)


def test_the_rate_limit_is_a_sliding_window(budgets, clock):
    for offset in (0, 20, 40):
        clock.now = NOON + offset
        assert isinstance(budgets.reserve("acme", 1, 0.0), Reservation)
    clock.now = NOON + 59
    refusal = budgets.reserve("acme", 1, 0.0)
    assert (refusal.limit, refusal.value, refusal.used) == ("requests_per_minute", 3, 3)
    assert refusal.retry_after_s == pytest.approx(1.0) and refusal.to_dict()["error"] == "rate-limited"
    clock.now = NOON + 60.5     # the first admission left the window; the other two are still in it
    assert isinstance(budgets.reserve("acme", 1, 0.0), Reservation)
    refusal = budgets.reserve("acme", 1, 0.0)
    assert refusal.limit == "requests_per_minute" and refusal.retry_after_s == pytest.approx(19.5)


def test_an_actual_above_the_estimate_is_charged_in_full_and_nothing_passes_after(budgets):
    held = budgets.reserve("trial", 60, 0.0)
    budgets.settle(held, 150, 0.0)
    usage = budgets.usage("trial")
    assert usage.tokens_spent == 150 and usage.tokens_remaining == 0
    refusal = budgets.reserve("trial", 1, 0.0)
    assert isinstance(refusal, Refusal) and refusal.used == 150


def test_day_rollover_resets_tokens_and_cost(budgets, clock):
    clock.now = datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC).timestamp()
    budgets.settle(budgets.reserve("acme", 1000, 0.001), 1000, 0.001)
    late = budgets.reserve("acme", 1, 0.0)
    assert late.limit == "daily_tokens" and late.retry_after == 1
    clock.now += 1
    usage = budgets.usage("acme")
    assert (usage.day, usage.tokens_spent, usage.tokens_remaining, usage.cost_remaining) == ("2026-11-27", 0, 1000,
                                                                                             0.001)
    assert isinstance(budgets.reserve("acme", 1000, 0.001), Reservation)


def test_a_reservation_settled_after_midnight_is_charged_to_its_day(budgets, clock):
    clock.now = datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC).timestamp()
    held = budgets.reserve("trial", 100, 0.0)
    clock.now += 2
    assert budgets.usage("trial").tokens_remaining == 100     # yesterday's reservation holds nothing today
    budgets.settle(held, 90, 0.0)
    assert budgets.usage("trial").tokens_spent == 0


def test_a_reservation_never_settled_is_charged_at_its_estimate_after_the_ttl(tmp_path, clock):
    budgets = Budgets(tmp_path / "b.sqlite", TENANTS, clock=clock, reservation_ttl_s=100)
    lost = budgets.reserve("trial", 40, 0.0)        # its worker was killed
    clock.now += 101
    budgets.reserve("trial", 10, 0.0)               # the next reservation charges it
    usage = budgets.usage("trial")
    assert (usage.tokens_spent, usage.tokens_held) == (40, 10)
    assert budgets.settle(lost, 55, 0.0) is True    # a late answer: only the excess over the estimate
    assert budgets.usage("trial").tokens_spent == 55
    stale = budgets.reserve("trial", 5, 0.0)
    clock.now += 101                                # the 10 and the 5 were never settled either
    budgets.reserve("trial", 1, 0.0)
    assert budgets.release(stale) is True and budgets.usage("trial").tokens_spent == 70   # stays charged


def test_bad_arguments(budgets):
    with pytest.raises(SpecError, match="no tenant 'globex'"):
        budgets.reserve("globex", 1, 0.0)
    for tokens, cost in ((-1, 0.0), (1.5, 0.0), (True, 0.0), (1, -0.1), (1, float("nan")), (1, float("inf"))):
        with pytest.raises(ValueError):
            budgets.reserve("acme", tokens, cost)
    assert budgets.usage("acme").requests_last_minute == 0


def test_a_tenant_without_limits_is_never_refused(budgets):
    for _ in range(20):
        assert isinstance(budgets.reserve("free", 10**9, 10**6), Reservation)


def test_costs_are_exact_integers_rounded_up():
    assert _units(0.3) == 300_000_000 and _units(1e-9) == 1 and _units(1.4e-9) == 2 and _units(0.0) == 0
    assert sum(_units(0.0000001) for _ in range(10)) == _units(0.000001)


# -- a state machine checked against a plain model ---------------------------------------------------------

def _dump(path: Path) -> list:
    with sqlite3.connect(path) as db:
        return [sorted(db.execute(f"SELECT * FROM {table}").fetchall())
                for table in ("spent", "held", "admitted")]


class BudgetMachine(RuleBasedStateMachine):
    """Every reserve is decided exactly as a few lines of Python decide it; a refusal changes no row; the
    remaining never reads negative; a day's tokens reset at midnight UTC."""

    LIMITS = TenantSpec(requests_per_minute=4, daily_tokens=500, daily_cost=0.0005)

    def __init__(self):
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.path = Path(self.folder.name) / "budgets.sqlite"
        self.clock = Clock(datetime(2026, 11, 26, 23, 55, tzinfo=UTC).timestamp())
        self.budgets = Budgets(self.path, {"t": self.LIMITS}, clock=self.clock, reservation_ttl_s=10**9)
        self.spent: dict[str, list[int]] = {}          # day → [tokens, cost units]
        self.held: list[Reservation] = []   # in the order reserved: draws must not depend on random ids
        self.admitted: list[float] = []

    def teardown(self):
        self.budgets.close()
        self.folder.cleanup()

    def _day(self) -> str:
        return datetime.fromtimestamp(self.clock.now, UTC).date().isoformat()

    def _today(self) -> tuple[int, int]:
        tokens, cost = self.spent.get(self._day(), [0, 0])
        held = [r for r in self.held if r.day == self._day()]
        return tokens + sum(r.tokens for r in held), cost + sum(_units(r.cost) for r in held)

    @rule(tokens=st.integers(0, 300), cost=st.integers(0, 300))
    def reserve(self, tokens, cost):
        before = _dump(self.path)
        got = self.budgets.reserve("t", tokens, cost * 1e-6)
        recent = [at for at in self.admitted if at > self.clock.now - 60]
        used_tokens, used_cost = self._today()
        if len(recent) >= 4:
            expected = "requests_per_minute"
        elif used_tokens + tokens > 500:
            expected = "daily_tokens"
        elif used_cost + _units(cost * 1e-6) > _units(0.0005):
            expected = "daily_cost"
        else:
            expected = None
        if expected is None:
            assert isinstance(got, Reservation), got
            self.held.append(got)
            self.admitted.append(self.clock.now)
        else:
            assert isinstance(got, Refusal) and got.limit == expected, (got, expected)
            assert got.retry_after >= 1
            assert _dump(self.path) == before

    @precondition(lambda self: self.held)
    @rule(data=st.data(), fraction=st.floats(0, 2))
    def settle(self, data, fraction):
        reservation = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        tokens, cost = int(reservation.tokens * fraction), int(_units(reservation.cost) * fraction)
        assert self.budgets.settle(reservation, tokens, cost * COST_UNIT)
        day = self.spent.setdefault(reservation.day, [0, 0])
        day[0] += tokens
        day[1] += _units(cost * COST_UNIT)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        assert self.budgets.release(self.held.pop(data.draw(st.integers(0, len(self.held) - 1))))

    @rule(seconds=st.sampled_from([0.5, 5, 30, 59.9, 60, 61, 400]))
    def wait(self, seconds):
        self.clock.now += seconds

    @invariant()
    def usage_matches_the_model(self):
        usage = self.budgets.usage("t")
        tokens, cost = self._today()
        assert usage.tokens_spent + usage.tokens_held == tokens
        assert usage.tokens_remaining == max(0, 500 - tokens) and usage.tokens_remaining >= 0
        assert usage.cost_remaining >= 0
        assert usage.requests_last_minute == len([at for at in self.admitted if at > self.clock.now - 60])


BudgetMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_budget_state_machine = BudgetMachine.TestCase


# -- many threads and several processes on one file ---------------------------------------------------------------

SHARED = {"a": TenantSpec(daily_tokens=300, daily_cost=0.0003), "r": TenantSpec(requests_per_minute=5)}
# (tenant, est tokens, est cost in 1e-6, share of the estimate actually used or None = released, later steps)
OP = st.tuples(st.sampled_from(["a", "a", "r"]), st.integers(0, 150), st.integers(0, 150),
               st.one_of(st.none(), st.floats(0, 1)), st.integers(0, 3))
PLANS = st.lists(st.lists(OP, min_size=1, max_size=10), min_size=2, max_size=4)


def _run_plan(path: str, plan: list) -> dict:
    """One worker: reserve, hold for a few steps, settle (at most the estimate) or release; after every step read
    the shared state and note any moment at which spent + held passed a limit."""
    budgets = Budgets(Path(path), SHARED)
    out = {"violations": [], "tokens": 0, "cost": 0, "admitted_r": 0}
    pending: list[list] = []

    def finish(item):
        reservation, share = item
        if share is None:
            assert budgets.release(reservation)
        else:
            tokens, cost = int(reservation.tokens * share), int(_units(reservation.cost) * share)
            assert budgets.settle(reservation, tokens, cost * COST_UNIT)
            if reservation.tenant == "a":
                out["tokens"] += tokens
                out["cost"] += cost

    def check():
        usage = budgets.usage("a")
        if usage.tokens_spent + usage.tokens_held > 300 or \
                _units(usage.cost_spent) + _units(usage.cost_held) > _units(0.0003):
            out["violations"].append(usage.to_dict())
        if usage.tokens_remaining < 0 or usage.cost_remaining < 0:
            out["violations"].append(usage.to_dict())

    for tenant, tokens, cost, share, later in plan:
        got = budgets.reserve(tenant, tokens, cost * 1e-6)
        if isinstance(got, Reservation):
            out["admitted_r"] += tenant == "r"
            pending.append([later, (got, share)])
        check()
        for item in [p for p in pending if p[0] <= 0]:
            pending.remove(item)
            finish(item[1])
            check()
        for item in pending:
            item[0] -= 1
    for _, item in pending:
        finish(item)
    check()
    budgets.close()
    return out


def _process_worker(path: str, plan: list, queue) -> None:
    queue.put(_run_plan(path, plan))


def _check_totals(path: Path, results: list[dict]) -> None:
    assert [v for r in results for v in r["violations"]] == []
    budgets = Budgets(path, SHARED)
    usage = budgets.usage("a")
    assert usage.tokens_held == 0 and usage.cost_held == 0
    assert usage.tokens_spent == sum(r["tokens"] for r in results)
    assert _units(usage.cost_spent) == sum(r["cost"] for r in results)
    # every admission happened within one minute: no more than the rate across all workers
    assert sum(r["admitted_r"] for r in results) <= 5
    assert budgets.usage("r").requests_last_minute == sum(r["admitted_r"] for r in results)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=PLANS)
def test_threads_sharing_one_file_never_overspend(plans):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "budgets.sqlite"
        results: list[dict] = [{}] * len(plans)
        barrier = threading.Barrier(len(plans))

        def work(i):
            barrier.wait()
            results[i] = _run_plan(str(path), plans[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert all(not t.is_alive() for t in threads) and all(results)
        _check_totals(path, results)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=st.lists(st.lists(OP, min_size=1, max_size=10), min_size=2, max_size=3))
def test_processes_sharing_one_file_never_overspend(plans):
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "budgets.sqlite"
        Budgets(path, SHARED).close()   # the schema exists before the workers race
        queue = context.Queue()
        workers = [context.Process(target=_process_worker, args=(str(path), plan, queue)) for plan in plans]
        for worker in workers:
            worker.start()
        results = [queue.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(timeout=10)
            assert worker.exitcode == 0
        _check_totals(path, results)


def test_a_fresh_file_is_created_by_workers_racing_to_open_it(tmp_path):
    context = multiprocessing.get_context("fork")
    path = tmp_path / "state" / "budgets.sqlite"
    queue = context.Queue()
    plan = [("a", 10, 10, 1.0, 0)] * 3
    workers = [context.Process(target=_process_worker, args=(str(path), plan, queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0
    _check_totals(path, results)
    assert Budgets(path, SHARED).usage("a").tokens_spent == 90
