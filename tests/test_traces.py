"""Trace records, segment files and ingestion (framework/traces.py) without a server.

The served path (two workers, one killed mid-run) is tests/e2e/test_traces_served.py; here the
segment files are written by `Tracer` itself, the one the service uses, with `FakeCall`s standing
in for the model's `CallStats`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import pytest

from framework.evaluate import store_path
from framework.spec import TracingSpec, load_project
from framework.store import Store
from framework.traces import RequestIndex, SegmentWriter, Tracer, ingest, parse_since, read_chunk, segments, utc_now

IDENTITY = {"project": "ticket-triage", "channel": "prod", "bento": "ticket-triage:v1", "version": "v1",
            "model_sha256": "ab" * 32, "program_hash": "cd" * 32}


@dataclass
class FakeCall:
    """Stands in for lm.CallStats: the fields a trace reads."""

    latency_ms: float = 40.0
    tokens_in_new: int = 30
    tokens_in_cached: int = 600
    tokens_out: int = 12
    finish_reason: str = "stop"
    raw_text: str | None = '{"category": "billing"}'
    format_problems: list | None = None
    messages: list | None = None
    started: float | None = None
    waited_ms: float = 5.0
    raw_valid: bool | None = True


@pytest.fixture
def project(project_root):
    return load_project(str(project_root / "projects" / "ticket-triage"))


def answer(tracer: Tracer, request_id: str, ticket: str = "My invoice is wrong", status: int = 200, **extra):
    t0 = time.perf_counter()
    call = FakeCall(messages=[{"role": "user", "content": ticket}], started=t0 + 0.001)
    return tracer.record(request_id=request_id, started_at=utc_now(), t0=t0, t_valid=t0 + 0.0005,
                         t_end=t0 + 0.06, status=status, inputs={"ticket": ticket},
                         outputs={"category": "billing"} if status == 200 else None,
                         calls=[call] if status != 413 else [], **extra)


def test_a_trace_has_versions_tokens_cost_and_stages(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    trace = answer(tracer, "req-1")
    assert trace["request_id"] == "req-1" and trace["bento"] == "ticket-triage:v1" and trace["channel"] == "prod"
    assert (trace["tokens_in_new"], trace["tokens_in_cached"], trace["tokens_out"]) == (30, 600, 12)
    assert trace["cost"] > 0
    names = [stage["name"] for stage in trace["stages"]]
    assert names[0] == "validation" and "model_call_0" in names and names[-1] == "parse"
    assert trace["calls"][0]["messages"][0]["content"] == "My invoice is wrong"
    line = json.loads(tracer.writer.path.read_text().splitlines()[0])
    assert line == json.loads(json.dumps(trace))


def test_ingest_is_idempotent_and_keeps_one_row_per_trace(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    for i in range(5):
        answer(tracer, f"req-{i}")
    first = ingest(project)
    second = ingest(project)
    assert (first.traces, second.traces) == (5, 0)
    answer(tracer, "req-5")
    assert ingest(project).traces == 1
    with Store(store_path(project), read_only=True) as store:
        rows = store.traces(limit=None)
    assert sorted(r["request_id"] for r in rows) == [f"req-{i}" for i in range(6)]
    assert rows[0]["stages"] and rows[0]["inputs"] == {"ticket": "My invoice is wrong"}


def test_an_ingest_killed_before_commit_is_redone_without_duplicates(project, monkeypatch):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    for i in range(3):
        answer(tracer, f"req-{i}")

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    original = Store.add_segment_rows
    monkeypatch.setattr(Store, "add_segment_rows", killed)
    with pytest.raises(KeyboardInterrupt):
        ingest(project)
    monkeypatch.setattr(Store, "add_segment_rows", original)
    assert ingest(project).traces == 3
    assert ingest(project).traces == 0


def test_a_line_cut_short_waits_for_its_writer_and_is_skipped_once_it_is_gone(project):
    writer = SegmentWriter(project.trace_dir, "traces")
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    tracer.writer = writer
    answer(tracer, "req-0")
    with open(writer.path, "ab") as fh:
        fh.write(b'{"trace_id": "cut", "request_id": "req-1", "sta')   # a worker killed mid-write
    result = ingest(project)
    assert result.traces == 1 and result.skipped == []   # its writer (this process) lives: wait
    dead = writer.path.with_name(writer.path.name.replace(f"-{os.getpid()}-", "-999999999-"))
    writer.path.rename(dead)
    with Store(store_path(project)) as store:   # the rename is a new segment name: forget the old offset
        store.forget_segment(f"traces/{writer.path.name}")
    result = ingest(project)
    assert result.traces == 0   # req-0 is already in (same trace_id)
    assert len(result.skipped) == 1 and "cut short" in result.skipped[0] and dead.name in result.skipped[0]
    with Store(store_path(project), read_only=True) as store:
        assert [r["request_id"] for r in store.traces(limit=None)] == ["req-0"]


def test_garbage_lines_are_reported_with_their_place_and_not_ingested(project):
    writer = SegmentWriter(project.trace_dir, "traces")
    writer.append({"trace_id": "t1", "request_id": "r1", "started_at": "2026-11-26T10:00:00", "duration_ms": 5,
                   "status": 200})
    with open(writer.path, "ab") as fh:
        fh.write(b"not json\n")
        fh.write(b'{"trace_id": "t2", "request_id": "r2"}\n')
        fh.write(b'{"trace_id": "t3", "request_id": "r3", "started_at": "yesterday", "duration_ms": 1, '
                 b'"status": 200}\n')
    result = ingest(project)
    assert result.traces == 1
    assert [s.split(": ", 1)[1].split(" ")[0] for s in result.skipped] == ["not", "missing", "started_at"]
    assert all(writer.path.name in s and "byte" in s for s in result.skipped)


def test_keep_text_false_keeps_figures_only(project):
    tracer = Tracer(TracingSpec(keep_text=False), project.trace_dir, IDENTITY, project.model())
    trace = answer(tracer, "req-1")
    assert trace["inputs"] is None and trace["outputs"] is None
    assert trace["calls"][0]["messages"] is None and trace["calls"][0]["output"] is None
    assert trace["tokens_out"] == 12


def test_tracing_off_writes_nothing(project):
    tracer = Tracer(TracingSpec(enabled=False), project.trace_dir, IDENTITY, project.model())
    assert answer(tracer, "req-1") is None
    assert segments(project.trace_dir, "traces") == []


def test_retention_deletes_old_rows_and_old_ingested_segments(project):
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    answer(tracer, "old")
    old = time.time() - 40 * 86400
    os.utime(tracer.writer.path, (old, old))
    with Store(store_path(project)) as store:
        ingest(project, store=store)
        store.con.execute("UPDATE traces SET started_at = started_at - INTERVAL 40 DAY")
    tracer.writer.close()
    result = ingest(project)   # [tracing] retention_days = 30 by default
    assert result.deleted == 1
    assert not tracer.writer.path.exists()


def test_request_index_sees_every_workers_segments(project):
    one = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    two = Tracer(TracingSpec(), project.trace_dir, {**IDENTITY, "bento": "ticket-triage:v2", "version": "v2"},
                 project.model())
    answer(one, "from-one")
    index = RequestIndex(project.trace_dir)
    assert index.lookup("from-one")["bento"] == "ticket-triage:v1"
    answer(two, "from-two")
    assert index.lookup("from-two")["version"] == "v2"
    assert index.lookup("never") is None


def test_a_cut_tail_from_another_host_waits_until_the_segment_is_abandoned(tmp_path):
    path = tmp_path / "traces" / "other-host-999999999-20261126T000000-abcdef.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"trace_id": "a", "request_id": "r", "started_at": "2026-11-26T00:00:00", '
                     b'"duration_ms": 1, "status": 200}\n{"trace_id": "b"')
    chunk = read_chunk(path, "traces", 0)   # its writer may be alive over there
    assert len(chunk.rows) == 1 and chunk.skipped == [] and chunk.end < path.stat().st_size
    old = time.time() - 3600
    os.utime(path, (old, old))
    chunk = read_chunk(path, "traces", 0)
    assert len(chunk.rows) == 1 and chunk.end == path.stat().st_size and "cut short" in chunk.skipped[0]


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800),
                                               ("1.5h", 5400), ("2w", 1209600)])
def test_parse_since(text, seconds):
    assert parse_since(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "1y", "-1h", "1 hour"])
def test_parse_since_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_since(text)


def test_a_segment_deleted_under_its_writer_is_replaced_and_nothing_after_is_lost(project):
    """Retention may delete an old day's file while its worker lives: the next line goes to a new file."""
    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    answer(tracer, "before")
    first = tracer.writer.path
    assert ingest(project).traces == 1
    first.unlink()
    answer(tracer, "after")
    assert tracer.writer.path != first and tracer.writer.path.exists()
    assert ingest(project).traces == 1
    assert RequestIndex(project.trace_dir).lookup("after") is not None


def test_a_new_day_starts_a_new_segment(project, monkeypatch):
    import framework.traces as traces

    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    answer(tracer, "today")
    first = tracer.writer.path
    monkeypatch.setattr(traces, "utc_now", lambda: traces.datetime(2099, 1, 2, 0, 0, 1))
    answer(tracer, "tomorrow")
    assert tracer.writer.path != first and "20990102T000001" in tracer.writer.path.name


def test_a_value_of_the_wrong_type_skips_its_line_and_never_blocks_ingest(project):
    writer = SegmentWriter(project.trace_dir, "traces")
    good = {"trace_id": "t1", "request_id": "r1", "started_at": "2026-11-26T10:00:00", "duration_ms": 5,
            "status": 200}
    writer.append({**good, "tokens_out": "abc"})
    writer.append({**good, "trace_id": "t2", "status": 2**40})
    writer.append({**good, "trace_id": "t3", "started_at": "2026-11-26T10:00:00+05:00"})
    writer.append({**good, "trace_id": "t4", "inputs": {"ticket": "fine"}})
    result = ingest(project)
    assert result.traces == 1 and len(result.skipped) == 3
    assert "tokens_out" in result.skipped[0] and "status" in result.skipped[1] and "time zone" in result.skipped[2]
    writer.append({**good, "trace_id": "t5"})
    assert ingest(project).traces == 1


def test_ingest_reads_a_big_segment_in_blocks(project, monkeypatch):
    import framework.traces as traces

    tracer = Tracer(TracingSpec(), project.trace_dir, IDENTITY, project.model())
    for i in range(50):
        answer(tracer, f"req-{i}")
    monkeypatch.setattr(traces, "MAX_CHUNK_BYTES", 4096)   # a few traces a block
    calls = []
    real = Store.add_segment_rows

    def counting(self, *args, **kwargs):
        calls.append(kwargs["end"] - kwargs["start"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "add_segment_rows", counting)
    assert ingest(project).traces == 50
    assert len(calls) > 5 and max(calls) <= 4096 + 4096
