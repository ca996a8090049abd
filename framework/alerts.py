"""The production contract → Prometheus alerting rules over what a served bento exposes on /metrics.

`slipway check` judges a version against the contract once, on the eval set; these rules judge it
continuously, on served traffic, with the same definitions as `slipway slo` (Store.slo_figures): latency
percentiles over answered requests, the error rate as 5xx over every request but the caller's own 4xx
mistakes, tokens per request as new prompt + generated tokens of answered requests, cost per request over
answered and failed ones, and the monthly budget as the current spend rate over 30 days. Only the clauses
the contract declares become rules. `slipway build` writes them into the bento as `slipway/alerts.yml`,
covered by the signed manifest, so the rules a version is watched by are the contract it was built with.

The metric names and buckets are defined here and used by framework/service.py, so the rules and the
metrics they query cannot drift apart; the contract's own thresholds are histogram bucket bounds, so
"over the clause" is read from an exact bucket rather than interpolated between two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# What framework/service.py exposes (prometheus_client: a Counter `x` is scraped as `x_total`, a Histogram
# `x` as `x_bucket`, `x_sum` and `x_count`). Every series carries bento_version ("project:version") and tenant.
REQUEST_SECONDS = "slipway_request_seconds"      # histogram; outcome: ok (2xx/3xx), error (5xx), rejected (4xx)
REQUEST_TOKENS = "slipway_request_tokens"        # histogram; new prompt + generated tokens, answered requests
REQUEST_COST = "slipway_request_cost"            # histogram; cost of answered and failed (5xx) requests
ERRORS = "slipway_errors"                        # counter; status: the HTTP status of every 4xx/5xx answer
COST = "slipway_cost"                            # counter; all cost, for the budget
TOKENS = "slipway_tokens"                        # counter; direction: input, input_cached, output

_COLLECTORS: dict[str, Any] = {}


def collector(kind: str, name: str, **kwargs: Any) -> Any:
    """The prometheus_client Counter/Histogram `name`, made once per process.

    framework/service.py makes its metrics at import; `slipway build` imports that module afresh for each
    bento it builds (framework/build.py), and prometheus_client refuses a second collector of one name. A
    later import gets the first one back: metrics are only recorded in a served worker, which imports the
    service once. prometheus_client is imported here, late, because BentoML sets its multiprocess folder
    (PROMETHEUS_MULTIPROC_DIR) before the worker imports the service and the library reads it at import."""
    if name not in _COLLECTORS:
        import prometheus_client

        _COLLECTORS[name] = getattr(prometheus_client, kind)(name=name, **kwargs)
    return _COLLECTORS[name]


LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
COST_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0)

WINDOW = "5m"            # rate window for latency and errors: quick to see an outage
MEAN_WINDOW = "15m"      # for per-request means (tokens, cost): one long answer should not page anyone
BUDGET_WINDOW = "1h"     # spend rate projected over a month
MONTH_S = 30 * 86400     # a month of the contract's monthly_budget, as metrics.Measurements projects it

LATENCY = ((0.5, "latency_p50_ms"), (0.95, "latency_p95_ms"), (0.99, "latency_p99_ms"))


def latency_buckets(contract) -> tuple[float, ...]:
    """The latency histogram's bounds (seconds): the defaults and every latency clause of `contract`."""
    return _with(LATENCY_BUCKETS_S, [getattr(contract, f) / 1000 for _, f in LATENCY if getattr(contract, f)])


def token_buckets(contract) -> tuple[float, ...]:
    return _with(TOKEN_BUCKETS, [contract.tokens_per_request_max])


def cost_buckets(contract) -> tuple[float, ...]:
    return _with(COST_BUCKETS, [contract.cost_per_request_max])


def _with(defaults, extra) -> tuple[float, ...]:
    return tuple(sorted({float(b) for b in defaults} | {float(b) for b in extra if b}))


def _number(value: float) -> str:
    """A PromQL number literal: 16, 0.01, 2e-05."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _rate(metric: str, selector: str, window: str) -> str:
    return f"sum by (bento_version) (rate({metric}{{{selector}}}[{window}]))"


def alert_rules(spec, *, bento_version: str | None = None) -> dict[str, Any]:
    """The Prometheus rule file (as a dict) for `spec`'s contract: one rule group named for the project,
    one alert per declared clause, each on every version of the project (`bento_version` says which).

    `bento_version` ("project:version", or a placeholder such as Argo's "{{args.bento-version}}",
    framework/argo.py) narrows the per-request rules to that one version, so a canary is judged on its own
    traffic; the monthly budget stays on every version, since the budget is the project's spend."""
    project = spec.project.name
    contract = spec.contract
    mine = f'bento_version=~"{project}:.*"'
    judged = mine if bento_version is None else f'bento_version="{bento_version}"'
    rules = []

    def rule(name: str, clause: str, expr: str, wait: str, severity: str, summary: str, what: str,
             who: str = "{{ $labels.bento_version }}") -> None:
        rules.append({
            "alert": name, "expr": expr, "for": wait,
            "labels": {"severity": severity, "project": project, "clause": f"contract.{clause}"},
            "annotations": {
                "summary": f"{who}: {summary}",
                "description": (f"{what}, on served traffic of {project}, breaks the production contract "
                                f"(contract.{clause} = {_number(getattr(contract, clause))} in "
                                f"projects/{project}/project.toml). `slipway slo {project}` shows the "
                                "figures from the traces; `slipway traces` the requests."),
            }})

    for quantile, clause in LATENCY:
        limit_ms = getattr(contract, clause)
        if limit_ms is None:
            continue
        label = f"p{round(quantile * 100)}"
        rule(f"SlipwayLatency{label.upper()}", clause,
             f"histogram_quantile({_number(quantile)}, sum by (le, bento_version) "
             f'(rate({REQUEST_SECONDS}_bucket{{{judged},outcome="ok"}}[{WINDOW}]))) > {_number(limit_ms / 1000)}',
             "10m", "warning",
             f"{label} latency {{{{ $value | humanizeDuration }}}} is over the contract's {_number(limit_ms)} ms",
             f"The {label} latency of answered requests over {WINDOW}")
    if contract.error_rate_max is not None:
        failed, counted = judged + ',status=~"5.."', judged + ',outcome!="rejected"'
        rule("SlipwayErrorRate", "error_rate_max",
             f"{_rate(ERRORS + '_total', failed, WINDOW)} / {_rate(REQUEST_SECONDS + '_count', counted, WINDOW)} "
             f"> {_number(contract.error_rate_max)}",
             "5m", "critical",
             "{{ $value | humanizePercentage }} of requests answered 5xx, over the contract's "
             f"{contract.error_rate_max:.2%}",
             f"The share of requests answered with a 5xx over {WINDOW} (a caller's 4xx is not counted)")
    if contract.cost_per_request_max is not None:
        rule("SlipwayCostPerRequest", "cost_per_request_max",
             f"{_rate(REQUEST_COST + '_sum', judged, MEAN_WINDOW)} / "
             f"{_rate(REQUEST_COST + '_count', judged, MEAN_WINDOW)} > {_number(contract.cost_per_request_max)}",
             "15m", "warning",
             f"mean cost per request {{{{ $value | printf \"%.6g\" }}}} is over the contract's "
             f"{_number(contract.cost_per_request_max)}",
             f"The mean cost per request over {MEAN_WINDOW}")
    if contract.tokens_per_request_max is not None:
        rule("SlipwayTokensPerRequest", "tokens_per_request_max",
             f"{_rate(REQUEST_TOKENS + '_sum', judged, MEAN_WINDOW)} / "
             f"{_rate(REQUEST_TOKENS + '_count', judged, MEAN_WINDOW)} > {_number(contract.tokens_per_request_max)}",
             "15m", "warning",
             f"mean tokens per request {{{{ $value | printf \"%.0f\" }}}} is over the contract's "
             f"{_number(contract.tokens_per_request_max)}",
             f"The mean of new prompt + generated tokens per answered request over {MEAN_WINDOW}")
    if contract.monthly_budget is not None:
        rule("SlipwayMonthlyBudgetBurn", "monthly_budget",
             f"sum(rate({COST}_total{{{mine}}}[{BUDGET_WINDOW}])) * {MONTH_S} > {_number(contract.monthly_budget)}",
             "30m", "warning",
             f"spending at {{{{ $value | printf \"%.2f\" }}}} a month, over the contract's monthly budget of "
             f"{_number(contract.monthly_budget)}",
             f"The spend rate of the last {BUDGET_WINDOW}, over 30 days and every version", who=project)
    return {"groups": [{"name": f"slipway-{project}", "rules": rules}]}


def write_alert_rules(spec, path: Path) -> int:
    """Write `alert_rules(spec)` as a Prometheus rule file (YAML) at `path`; returns how many alerts.
    Load it with `rule_files:` in prometheus.yml; `promtool check rules <path>` validates it."""
    import yaml

    rules = alert_rules(spec)
    header = (f"# Prometheus alerting rules from the production contract of {spec.project.name}\n"
              "# (written by `slipway build`, framework/alerts.py; change [contract] in project.toml, not this file)\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(rules, sort_keys=False, width=1000, allow_unicode=True), encoding="utf-8")
    return len(rules["groups"][0]["rules"])
