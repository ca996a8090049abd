"""Callers and tenants through the real path: signed API keys made by `slipway keys create`, a bento served
by `slipway serve` on 127.0.0.1 that requires them, budgets held across requests, and feedback kept
within a tenant. Each refusal is a walk-around attempt: no key, a made-up key, a revoked key, a key used
outside its scope, a tenant over budget, feedback on another tenant's request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROLES, act_as, edit_toml, write_signers
from tests.conftest import cli_ok as ok
from tests.e2e.test_build_serve import _free_port, _stop, _wait_ready, loosen_latency

TENANTS = '''
[tenants.beta]
requests_per_minute = 100

[tenants.small]                 # a day's tokens below one request's worst case: always over budget
daily_tokens = 100
'''


@pytest.mark.model
def test_keys_budgets_and_tenant_walls_over_http(tiny_project, tiny_model_present, keys, monkeypatch):
    loosen_latency(tiny_project)
    edit_toml(tiny_project, '[serve]\nauth = "none"\n', "[serve]\n")   # keys required: the default
    edit_toml(tiny_project, "\n[contract]\n", TENANTS + "\n[contract]\n")
    write_signers(tiny_project.parent, keys, {**ROLES, "carol": [*ROLES["carol"], "keys"]})
    ok(["check", "ticket-triage"])
    built = json.loads(ok(["build", "ticket-triage", "--json"]).stdout)

    act_as(monkeypatch, keys, "carol")
    made = {t: json.loads(ok(["keys", "create", "ticket-triage", "--tenant", t, "--json"]).stdout)
            for t in ("acme", "beta", "small", "trial")}
    act_as(monkeypatch, keys, "bob")   # no `keys` role: refused
    from typer.testing import CliRunner

    from framework.cli import app
    assert CliRunner().invoke(app, ["keys", "create", "ticket-triage", "--tenant", "acme"]).exit_code != 0

    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "slipway"), "serve", built["tag"],
                               "--port", str(port)], env=os.environ.copy(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    ticket = {"ticket": "I was charged twice on invoice INV-2231, please refund one."}

    def ask(tenant: str | None, rid: str, *, key: str | None = None, path: str = "/triage", body=None):
        headers = {"X-Request-ID": rid}
        if key or tenant:
            headers["Authorization"] = f"Bearer {key or made[tenant]['key']}"
        return httpx.post(base + path, json=body if body is not None else ticket, headers=headers, timeout=120)

    try:
        _wait_ready(base, server)
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200   # probes need no key

        missing = ask(None, "t-none")
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert ask(None, "t-made-up", key="sk-slipway-" + "A" * 43).status_code == 401
        # a bad key is refused before the body is read: no 422 that would reveal the schema
        assert ask(None, "t-typo", key="nope", body={"tickt": "x"}).status_code == 401

        acme = ask("acme", "t-acme")
        assert acme.status_code == 200, acme.text
        beta = ask("beta", "t-beta")
        assert beta.status_code == 200, beta.text

        over = ask("small", "t-small")
        assert over.status_code == 429, over.text
        assert over.json()["limit"] == "daily_tokens" and "daily_tokens" in over.json()["error"]
        assert int(over.headers["retry-after"]) >= 1 and over.json()["retry_after"] >= 1
        assert ask("acme", "t-acme-2").status_code == 200   # one tenant over budget; the others served

        assert ask("trial", "t-trial").status_code == 403   # trial keys: the prod channel only

        feedback = {"request_id": "t-beta", "score": -1}
        assert ask("acme", "f-1", path="/feedback", body=feedback).status_code == 404   # beta's request
        assert ask("beta", "f-2", path="/feedback", body=feedback).status_code == 200
        assert ask(None, "f-3", path="/feedback", body=feedback).status_code == 401

        def read(tenant: str | None, rid: str):
            headers = {"Authorization": f"Bearer {made[tenant]['key']}"} if tenant else {}
            return httpx.get(f"{base}/traces/{rid}", headers=headers, timeout=30)

        own = read("acme", "t-acme")   # a tenant reads its own request back: the summary, never the texts
        assert own.status_code == 200 and own.json()["tenant"] == "acme" and own.json()["status"] == 200
        assert own.json()["tokens_out"] > 0 and "inputs" not in own.json() and "calls" not in own.json()
        assert read("acme", "t-beta").status_code == 404     # another tenant's: as if unknown
        assert read("acme", "t-nobody").status_code == 404
        assert read("beta", "t-beta").status_code == 200
        assert read(None, "t-acme").status_code == 401
        assert read("trial", "t-acme").status_code == 403   # trial keys: /triage on prod only
        # beta reuses acme's request id (X-Request-ID is the caller's): each tenant still sees only its own
        assert ask("beta", "t-acme").status_code == 200
        assert read("acme", "t-acme").json()["tenant"] == "acme" and read("beta", "t-acme").json()["tenant"] == "beta"
        assert ask("acme", "f-4", path="/feedback", body={"request_id": "t-acme", "score": 1}).status_code == 200

        act_as(monkeypatch, keys, "carol")
        ok(["keys", "revoke", "ticket-triage", made["beta"]["key_id"]])
        assert ask("beta", "t-beta-revoked").status_code == 401   # the live keys file: at once
    finally:
        _stop(server)

    traces = {row["request_id"]: row for row in json.loads(ok(["traces", "ticket-triage", "--json",
                                                               "--limit", "100"]).stdout)}
    assert traces["t-acme"]["tenant"] == "acme" and traces["t-acme"]["caller"] == made["acme"]["key_id"]
    assert traces["t-beta"]["tenant"] == "beta"
    assert traces["t-small"]["status"] == 429 and traces["t-small"]["tenant"] == "small"
    assert traces["t-none"]["status"] == 401 and traces["t-none"]["tenant"] is None
    listed = ok(["keys", "list", "ticket-triage", "--json"]).stdout
    assert made["acme"]["key"] not in listed   # only hashes are kept
