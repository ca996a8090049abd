"""bench/gpu_tokens.py on the CPU: records the program's real requests and replays them through the engine."""

from __future__ import annotations

import json

import pytest


@pytest.mark.model
def test_record_then_run_replays_the_served_call(tiny_model_present, project_root, monkeypatch, tmp_path, capsys,
                                                 bench_script):
    bench = bench_script("gpu_tokens")
    monkeypatch.chdir(project_root)
    requests = tmp_path / "requests.json"
    bench.record("ticket-triage", 2, requests, "tiny")
    recorded = json.loads(requests.read_text())
    assert len(recorded["requests"]) == 2
    assert {"category", "priority", "needs_human", "reason"} <= set(recorded["requests"][0]["schema"]["properties"])

    out = tmp_path / "run.json"
    bench.run([tiny_model_present], requests, pp=32, tg=4, reps=1, threads=2, out=out)
    rows = json.loads(out.read_text())["rows"]
    cpu = next(row for row in rows if row["device"] == "cpu")
    assert cpu["pp_tokens_per_s"] > 0 and cpu["tg_tokens_per_s"] > 0
    answers = cpu["served_call"]["answers"]
    assert len(answers) == 2 and all(json.loads(a)["category"] for a in answers)
    assert "tg t/s" in capsys.readouterr().out
