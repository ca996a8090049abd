"""Admission: how many requests a worker takes on, what it sheds, and what it degrades under load.

A worker's model answers `capacity` requests at a time (`[models.*] parallel`); the rest wait for it. Waiting
is useful only up to a point: past `serve.max_queue` waiting requests, every newcomer would time out after
holding a connection for `serve.timeout_s`, so it is refused at once with 429 and a `Retry-After` computed
from the queue ahead of it and the measured time per answer. Between `serve.degrade_at` and the bound,
the declared degradation steps apply (a smaller `max_tokens`, only a cheaper tier, no semantic-cache
embedding), so the queue drains faster, and the response says which applied.

Plain data and one lock, no I/O: the service's ASGI middleware asks `enter()` before reading the body and
calls `leave()` when the response is sent; the tests drive the same object from threads.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

# A degradation step as project.toml declares it: `max_tokens=48`, `tier=qwen05`, `skip=semantic_cache`.
STEP = re.compile(r"^(max_tokens|tier|skip)=([A-Za-z0-9_-]+)$")
SKIPPABLE = ("semantic_cache",)   # optional stages a loaded worker may leave out


@dataclass(frozen=True)
class Step:
    kind: str    # "max_tokens" | "tier" | "skip"
    value: str

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"


def parse_step(text: str) -> Step:
    """`max_tokens=48` → Step("max_tokens", "48"); ValueError saying what is allowed otherwise."""
    found = STEP.match(text.strip())
    if not found:
        raise ValueError(f"{text!r} is not a degradation step: write max_tokens=<N>, tier=<model key> or "
                         f"skip={'|'.join(SKIPPABLE)}")
    kind, value = found.groups()
    if kind == "max_tokens" and (not value.isdigit() or int(value) < 1):
        raise ValueError(f"{text!r}: max_tokens must be a whole number ≥ 1")
    if kind == "skip" and value not in SKIPPABLE:
        raise ValueError(f"{text!r}: the optional stages that can be skipped are {', '.join(SKIPPABLE)}")
    return Step(kind, value)


@dataclass(frozen=True)
class Admitted:
    """A request let in: its place in the worker (1 = the only one) and the steps that apply to it."""

    depth: int
    degraded: tuple[Step, ...] = ()


@dataclass(frozen=True)
class Shed:
    """A request refused because the queue is full: answer 429 with `Retry-After: retry_after`."""

    depth: int
    limit: int
    retry_after: int

    @property
    def message(self) -> str:
        return (f"overloaded: {self.depth} requests are in this worker, at most {self.limit} are taken "
                f"(serve.max_queue); retry after {self.retry_after} s")


@dataclass
class Admission:
    """Counts the requests inside one worker; thread-safe. `seconds_per_answer` starts from a guess (the
    warm-up answer's time) and follows measured answers (an exponentially weighted mean)."""

    capacity: int
    max_queue: int
    degrade_at: int | None = None
    steps: tuple[Step, ...] = ()
    seconds_per_answer: float = 5.0
    inside: int = 0
    shed_total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def limit(self) -> int:
        return self.capacity + self.max_queue

    def enter(self) -> Admitted | Shed:
        with self._lock:
            if self.inside >= self.limit:
                self.shed_total += 1
                return Shed(self.inside + 1, self.limit, self.retry_after(self.inside + 1))
            self.inside += 1
            depth = self.inside
        waiting = max(depth - self.capacity, 0)
        degraded = self.steps if self.degrade_at is not None and waiting >= self.degrade_at else ()
        return Admitted(depth, degraded)

    def leave(self) -> None:
        """A request left (answered, refused or failed)."""
        with self._lock:
            self.inside = max(self.inside - 1, 0)

    def answered(self, seconds: float) -> None:
        """The model answered a request in `seconds` (waiting excluded): Retry-After follows it."""
        if seconds > 0:
            with self._lock:
                self.seconds_per_answer = 0.8 * self.seconds_per_answer + 0.2 * seconds

    def retry_after(self, depth: int) -> int:
        """Seconds until a request at `depth` would reach the model: the answers ahead of it, `capacity` at a
        time. An estimate for clients' back-off, not a promise."""
        waiting = max(depth - self.capacity, 1)
        return max(1, math.ceil(waiting * self.seconds_per_answer / max(self.capacity, 1)))
