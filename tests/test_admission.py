"""Bounded admission: the worker takes `capacity + max_queue` requests, sheds the rest with a Retry-After, and
applies the declared degradation steps from `degrade_at` waiting requests on."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framework.admission import Admission, Admitted, Shed, Step, parse_step


def test_the_bound_is_capacity_plus_queue_and_the_next_is_shed_with_a_retry_after():
    gate = Admission(capacity=1, max_queue=2, seconds_per_answer=3.0)
    assert [type(gate.enter()) for _ in range(3)] == [Admitted, Admitted, Admitted]
    shed = gate.enter()
    assert isinstance(shed, Shed)
    assert (shed.depth, shed.limit) == (4, 3)
    assert shed.retry_after == 9    # three answers ahead of it, one at a time, 3 s each
    assert "serve.max_queue" in shed.message
    gate.leave()
    assert isinstance(gate.enter(), Admitted)   # a freed place is taken again
    assert gate.shed_total == 1


def test_degradation_applies_from_degrade_at_waiting_requests_on():
    steps = (parse_step("max_tokens=32"),)
    gate = Admission(capacity=1, max_queue=5, degrade_at=2, steps=steps)
    depths = [gate.enter() for _ in range(4)]
    assert [a.degraded for a in depths] == [(), (), steps, steps]   # waiting: 0, 1, 2, 3


def test_retry_after_follows_measured_answers():
    gate = Admission(capacity=2, max_queue=0, seconds_per_answer=10.0)
    for _ in range(30):
        gate.answered(1.0)
    assert gate.seconds_per_answer == pytest.approx(1.0, abs=0.05)
    gate.enter(), gate.enter()
    assert gate.enter().retry_after == 1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(0, 8), st.integers(1, 48))
def test_never_more_inside_than_the_limit_from_many_threads(capacity, max_queue, clients):
    gate = Admission(capacity=capacity, max_queue=max_queue)
    results: list = []
    go = threading.Event()

    def client():
        go.wait()
        results.append(gate.enter())

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    admitted = [r for r in results if isinstance(r, Admitted)]
    assert len(admitted) == min(clients, capacity + max_queue)
    assert gate.inside == len(admitted)
    assert all(r.retry_after >= 1 for r in results if isinstance(r, Shed))
    for _ in admitted:
        gate.leave()
    assert gate.inside == 0


@pytest.mark.parametrize("text", ["max_tokens=0", "max_tokens=x", "tokens=3", "max_tokens", "tier=qwen05; rm",
                                  "skip=guardrails", "skip=semantic cache"])
def test_a_bad_step_says_what_is_allowed(text):
    with pytest.raises(ValueError, match="max_tokens|semantic_cache"):
        parse_step(text)


def test_steps_read_back_as_declared():
    assert str(parse_step(" max_tokens=48 ")) == "max_tokens=48"
    assert parse_step("max_tokens=48") == Step("max_tokens", "48")
    assert parse_step("tier=qwen05") == Step("tier", "qwen05")
    assert parse_step("skip=semantic_cache") == Step("skip", "semantic_cache")
