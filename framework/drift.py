"""Does the eval set still look like the traffic? Served inputs in a window compared with the eval split.

A passing check says the program is good *on the eval set*; that only matters while the eval set resembles
what is served. Three two-sample tests compare served requests (answered, status < 400, within the window)
with the eval rows: input length (Kolmogorov–Smirnov), language mix (chi-square test of homogeneity on
py3langid's language per text) and predicted-label mix (the served answers' label against the eval set's
expected label, chi-square). A test *drifts* when its p-value is below the threshold (0.01 by default).
Below `MIN_SERVED` served requests a test reports "not enough traffic" instead of a p-value that would mean
nothing. Eval texts are redacted the way traces are before they are measured, so `[EMAIL]` placeholders
in served text do not count as a difference.

A label shift can mean the traffic changed or the model now answers differently; either way the eval set's
label mix no longer describes what is served. `compare()` is the pure core (texts and labels in, report
out); `drift()` reads them from the project's store and eval split.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from framework.spec import Project

THRESHOLD = 0.01
MIN_SERVED = 30
MIN_EXPECTED = 5.0          # chi-square's usual rule: every expected cell count at least this
UNDETERMINED = "und"        # ISO 639 code for text with no letters (py3langid would guess at random)
OTHER = "other"


@dataclass
class DriftTest:
    """One comparison. `statistic`, `p_value` and `drifted` are None when there was too little traffic."""

    name: str                       # input_length | language | predicted_label
    method: str
    n_served: int
    n_eval: int
    statistic: float | None = None
    p_value: float | None = None
    drifted: bool | None = None
    explanation: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        if self.p_value is None:
            return f"{self.name}: {self.explanation}"
        flag = "DRIFTED" if self.drifted else "ok"
        return (f"{self.name}: {flag} (p = {self.p_value:.3g}, {self.method} = {self.statistic:.3g}, "
                f"n = {self.n_served} served / {self.n_eval} eval): {self.explanation}")


@dataclass
class DriftReport:
    """What `slipway drift` prints (`lines()`) or emits with --json (`to_dict()`); exit 1 when `drifted`."""

    verdict: str                    # drifted | stable | not-enough-traffic
    summary: str
    threshold: float
    n_served: int
    n_eval: int
    tests: list[DriftTest] = field(default_factory=list)
    project: str | None = None
    since: str | None = None
    until: str | None = None
    window_s: float | None = None

    @property
    def drifted(self) -> bool:
        return self.verdict == "drifted"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drifted}

    def lines(self) -> list[str]:
        head = f"{self.project}: " if self.project else ""
        span = f" ({self.since} .. {self.until})" if self.since else ""
        return [f"{head}{self.summary}{span}", *(f"  {t.line()}" for t in self.tests)]


# -- the tests (pure) ----------------------------------------------------------------------------
def language(text: str) -> str:
    """ISO 639-1 code py3langid gives the text, or `und` for text without letters."""
    import py3langid

    if not any(ch.isalpha() for ch in text):
        return UNDETERMINED
    return str(py3langid.classify(text)[0])


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _too_few(test: DriftTest, what: str, min_served: int) -> DriftTest:
    test.explanation = (f"not enough traffic: {test.n_served} served {what} in the window, "
                        f"{min_served} needed for a meaningful test")
    return test


def length_test(served: list[str], reference: list[str], *, threshold: float, min_served: int) -> DriftTest:
    from scipy.stats import ks_2samp

    test = DriftTest("input_length", "KS", n_served=len(served), n_eval=len(reference))
    if len(served) < min_served or not reference:
        return _too_few(test, "tickets", min_served)
    a, b = [len(t) for t in served], [len(t) for t in reference]
    result = ks_2samp(a, b)
    ours, theirs = statistics.median(a), statistics.median(b)
    test.statistic, test.p_value = _finite(result.statistic), _finite(result.pvalue)
    test.drifted = test.p_value is not None and test.p_value < threshold
    test.detail = {"median_served": ours, "median_eval": theirs}
    if test.drifted:
        word = "longer" if ours > theirs or (ours == theirs and sum(a) / len(a) > sum(b) / len(b)) else "shorter"
        test.explanation = f"served tickets are {word}: median {ours:g} vs {theirs:g} chars"
    else:
        test.explanation = f"served tickets are as long as eval's: median {ours:g} vs {theirs:g} chars"
    return test


def merge_rare(served: Counter, reference: Counter, min_expected: float = MIN_EXPECTED) -> dict[str, list[int]]:
    """Category → [served count, eval count], rare categories pooled into `other` (smallest first) until every
    expected count of the 2×k table is at least `min_expected`, or two columns are left."""
    n_s, n_r = sum(served.values()), sum(reference.values())
    need = min_expected * (n_s + n_r) / max(min(n_s, n_r), 1)   # column total giving expected >= min_expected
    columns = {c: [served[c], reference[c]] for c in sorted(set(served) | set(reference), key=str)}
    other = [0, 0]
    while True:
        sizes = [(sum(v), c) for c, v in columns.items()] + ([(sum(other), OTHER)] if sum(other) else [])
        if len(sizes) <= 2 or min(sizes)[0] >= need:
            break
        smallest = min((sum(v), c) for c, v in columns.items())[1]
        s, r = columns.pop(smallest)
        other = [other[0] + s, other[1] + r]
    if sum(other):
        pooled = columns.get(OTHER, [0, 0])   # a real category spelt "other" is pooled with the rare ones
        columns[OTHER] = [pooled[0] + other[0], pooled[1] + other[1]]
    return columns


def mix_test(name: str, served: list[str], reference: list[str], *, threshold: float, min_served: int,
             noun: str, ours: str, theirs: str) -> DriftTest:
    """Chi-square test of homogeneity of two samples of categories; the explanation names the category
    whose share differs most."""
    from scipy.stats import chi2_contingency

    test = DriftTest(name, "chi-square", n_served=len(served), n_eval=len(reference))
    if len(served) < min_served or not reference:
        return _too_few(test, noun, min_served)
    s_counts, r_counts = Counter(served), Counter(reference)
    table = merge_rare(s_counts, r_counts)
    test.detail = {"counts": table}
    share = {c: (v[0] / len(served), v[1] / len(reference)) for c, v in table.items()}
    most = max(share, key=lambda c: (abs(share[c][0] - share[c][1]), c))
    described = (f"{ours} {share[most][0]:.0%} {most!r} vs {share[most][1]:.0%} {theirs}")
    if len(table) < 2:
        test.statistic, test.p_value, test.drifted = 0.0, 1.0, False
        test.explanation = f"nothing to compare: {most!r} is the only {name.replace('_', ' ')} in both"
        return test
    result = chi2_contingency([[v[0] for v in table.values()], [v[1] for v in table.values()]])
    test.statistic, test.p_value = _finite(result.statistic), _finite(result.pvalue)
    test.drifted = test.p_value is not None and test.p_value < threshold
    small = float(result.expected_freq.min()) < MIN_EXPECTED
    test.detail["approximate"] = small
    test.explanation = (described if test.drifted else f"alike (largest gap: {described})") + (
        " (few requests: some expected counts are below 5, so the p-value is rough)" if small else "")
    return test


def compare(served_texts: list[str], served_labels: list[str], eval_texts: list[str], eval_labels: list[str],
            *, threshold: float = THRESHOLD, min_served: int = MIN_SERVED, label: str = "label") -> DriftReport:
    """The three tests and the overall verdict, from plain lists (served answers' labels vs eval labels)."""
    tests = [
        length_test(served_texts, eval_texts, threshold=threshold, min_served=min_served),
        mix_test("language", [language(t) for t in served_texts], [language(t) for t in eval_texts],
                 threshold=threshold, min_served=min_served, noun="tickets", ours="served traffic is",
                 theirs="in the eval set"),
        mix_test("predicted_label", served_labels, eval_labels, threshold=threshold, min_served=min_served,
                 noun=f"answers with a {label}", ours=f"served answers' {label} is",
                 theirs="of eval labels"),
    ]
    if any(t.drifted for t in tests):
        names = ", ".join(t.name for t in tests if t.drifted)
        verdict, summary = "drifted", f"the eval set no longer represents traffic (drifted: {names})"
    elif len(served_texts) < min_served:
        verdict, summary = "not-enough-traffic", (f"not enough traffic: {len(served_texts)} served requests in "
                                                  f"the window, {min_served} needed to compare")
    else:
        verdict, summary = "stable", "the eval set still represents traffic"
    return DriftReport(verdict=verdict, summary=summary, threshold=threshold, n_served=len(served_texts),
                       n_eval=len(eval_texts), tests=tests)


# -- the edge: store and eval split ------------------------------------------------------------
def input_text(inputs: Any, fields: tuple[str, ...]) -> str | None:
    """A request's text as measured: its string input fields joined (None when it kept none)."""
    if not isinstance(inputs, dict):
        return None
    parts = [inputs[f] for f in fields if isinstance(inputs.get(f), str)]
    return "\n".join(parts) if parts else None


def label_field(examples) -> str | None:
    """The first expected label whose eval values are all strings (ticket-triage: category)."""
    for example in examples:
        for key in example.expected:
            if all(isinstance(e.expected.get(key), str) for e in examples):
                return key
    return None


def drift(project: Project, window: timedelta, *, threshold: float = THRESHOLD, min_served: int = MIN_SERVED,
          channel: str | None = None, version: str | None = None, label: str | None = None,
          until: datetime | None = None, ingest: bool = True) -> DriftReport:
    """Compare requests served in the last `window` (to `until`, default now, UTC) with the eval split.
    `ingest=False` only reads the store (the dashboard), leaving new segment lines for the next ingest."""
    from framework.dataset import load_examples
    from framework.evaluate import store_path
    from framework.redact import Redactor
    from framework.store import Store
    from framework.traces import ingest as ingest_segments
    from framework.traces import iso, utc_now

    examples = load_examples(project.split_path("eval"))
    fields = tuple(dict.fromkeys(k for e in examples for k in e.inputs))
    label = label or label_field(examples)
    until = until or utc_now()
    since = until - window
    if ingest:
        ingest_segments(project)
    with Store(store_path(project), read_only=True) as store:
        traces = store.traces(since=since, channel=channel, version=version, limit=None)
    served_texts, served_labels = [], []
    for trace in traces:
        if trace["started_at"] > until or trace["status"] >= 400:
            continue
        text = input_text(trace.get("inputs"), fields)
        if text is None:
            continue
        served_texts.append(text)
        outputs = trace.get("outputs")
        if label and isinstance(outputs, dict) and isinstance(outputs.get(label), str):
            served_labels.append(outputs[label])
    redactor = Redactor(project.spec.tracing)
    eval_texts = [redactor.text(t, {}) for e in examples if (t := input_text(e.inputs, fields)) is not None]
    eval_labels = [e.expected[label] for e in examples if label and isinstance(e.expected.get(label), str)]
    report = compare(served_texts, served_labels, eval_texts, eval_labels, threshold=threshold,
                     min_served=min_served, label=label or "label")
    report.project, report.since, report.until = project.name, iso(since), iso(until)
    report.window_s = window.total_seconds()
    return report
