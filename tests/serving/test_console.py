"""The console's data: the trainer's bounded history, and ``/v1/status`` from a real server."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from dynft.drift import Detection
from dynft.events import Rejection
from dynft.history import (
    CONSOLE_DIR,
    HISTORY_FILE,
    TEXT_CHARS,
    HistoryFile,
    HistoryReader,
    Point,
    read_points,
)
from dynft.loop import TrainingLoop
from dynft.recorder import dead_letter_of
from dynft.registry import AdapterRegistry
from dynft.settings import Settings
from dynft.sources import Record
from dynft.tasks import task_registry_dir

from helpers import keyword_events, write_jsonl
from serving.conftest import TOKEN, running_server

BAD_TEXT = "a secret complaint " * 20  # a dead letter's text: more than TEXT_CHARS
BAD_ROWS: list[object] = [b"{not json", {"id": "bad-1", "text": BAD_TEXT, "label": ""}]


def run_loop(settings: Settings, path: Path) -> TrainingLoop:
    """One life of a real training loop over a finite file, to its end."""
    settings.source.uri = f"file:{path}"
    settings.source.exit_at_end = True
    loop = TrainingLoop(settings)
    thread = threading.Thread(target=loop.run)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive()
    return loop


def status_schema(client: httpx.Client) -> dict[str, Any]:
    """The StatusResponse schema from the server's own OpenAPI document, resolvable on its own."""
    document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/status"]["get"]
    ref = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/StatusResponse"
    return {"$ref": ref, "components": document["components"]}


def test_history_skips_a_torn_line_and_stays_within_its_bounds(tmp_path: Path) -> None:
    path = tmp_path / HISTORY_FILE
    log = HistoryFile(path)
    for t in (1.0, 2.0, 3.0):
        log.append(Point(t=t, events=int(t)))
    with open(path, "ab") as fh:  # what a crash mid-write leaves
        fh.write(b'{"t": 4.0, "eve')
    assert [p.t for p in read_points(path)] == [1.0, 2.0, 3.0]
    HistoryFile(path).append(Point(t=5.0))  # a restarted writer cuts the torn line off first
    assert [p.t for p in read_points(path)] == [1.0, 2.0, 3.0, 5.0]

    bounded = HistoryFile(tmp_path / "bounded.jsonl", span_s=100.0, max_points=10)
    for t in range(30):
        bounded.append(Point(t=float(t)))
    kept = [p.t for p in read_points(bounded.path)]
    assert len(kept) <= 12 and kept[-1] == 29.0 and kept == sorted(kept)
    bounded.append(Point(t=1000.0))  # everything else is now more than the span old
    assert [p.t for p in read_points(bounded.path)] == [1000.0]


def test_the_reader_parses_only_what_was_appended_and_follows_a_compaction(tmp_path: Path) -> None:
    log = HistoryFile(tmp_path / HISTORY_FILE, span_s=50.0, max_points=1000)
    reader = HistoryReader(log.path)
    assert reader.points() == [] and not reader.exists
    for t in range(5):
        log.append(Point(t=float(t), events=t))
    assert [p.events for p in reader.points()] == [0, 1, 2, 3, 4]
    log.append(Point(t=5.0, events=5))
    assert [p.events for p in reader.points(since=4.0)] == [5]
    log.append(Point(t=100.0, events=100))  # compacts: a new file replaces the old one
    assert [p.events for p in reader.points()] == [100]


def test_a_long_history_is_sent_evenly_thinned_and_ending_at_the_newest_point(tmp_path: Path) -> None:
    """A probe's first poll of a day's history was 3.4 MB, and ten such polls at once slowed every
    prediction a hundredfold."""
    log = HistoryFile(tmp_path / HISTORY_FILE, span_s=1e9, max_points=100_000)
    for t in range(5001):
        log.append(Point(t=float(t), events=t))
    reader = HistoryReader(log.path)
    sent = [p.events for p in reader.points(most=2000)]
    assert len(sent) == 1667 and sent[-1] == 5000 and sent[:2] == [2, 5] and sent == sorted(sent)  # every 3rd
    assert [p.events for p in reader.points(since=4990.0, most=2000)] == list(range(4991, 5001))


def test_dead_letters_keep_their_text_only_when_allowed() -> None:
    record = Record(b"", "file:/home/someone/stream.jsonl", 7)
    raw = json.dumps({"id": "x-1", "text": BAD_TEXT, "label": ""}).encode()
    shown = dead_letter_of(Rejection("empty_label", "label is empty", raw, "x-1"), record, True, 0.0)
    assert (shown.id, shown.reason, shown.text) == ("x-1", "empty_label", BAD_TEXT[:TEXT_CHARS])
    hidden = dead_letter_of(Rejection("malformed_json", "bad", b"{oops /home/x"), record, False, 0.0)
    assert (hidden.id, hidden.text) == ("position 7", None)  # the stream's name (a path) is not shown
    in_file = Record(b"", "file:/home/someone/stream.jsonl", 1 << 60, where={"line": 3, "offset": 70})
    assert dead_letter_of(Rejection("malformed_json", "bad", b"{"), in_file, False, 0.0).id == "line 3"
    assert hidden.detail == "bad" and shown.detail == "label is empty"  # a rule's detail names no text
    quoting = Rejection("internal", f"ValueError: cannot tokenize {BAD_TEXT!r}", raw, "x-1")
    assert dead_letter_of(quoting, record, False, 0.0).detail == "ValueError"  # an exception's message may quote it
    assert BAD_TEXT[:20] in dead_letter_of(quoting, record, True, 0.0).detail


def test_status_is_incremental_survives_a_restart_and_follows_its_schema(
    tiny_settings: Settings, tmp_path: Path
) -> None:
    tiny_settings.evaluation.window = 50  # also what makes a label "new": first seen in the last 50 events
    events = keyword_events(290, ["alpha", "beta"], seed=3)
    events += keyword_events(30, ["gamma"], seed=4, prefix="g")  # a label that appears at the end
    first = write_jsonl(tmp_path / "first.jsonl", [*events[:160], *BAD_ROWS])
    loop = run_loop(tiny_settings, first)
    # A drift detection cannot be caused in a few hundred events: this one is handed to the
    # recorder directly, to prove its marker reaches the page and outlives the restart.
    loop.history.drift(Detection(stream="error", detector="ADWIN", index=77))
    loop.history.record(loop)
    history = tiny_settings.state_dir / CONSOLE_DIR / HISTORY_FILE
    before = read_points(history)
    assert len(before) >= 3  # the first status, the one at shutdown, the one above
    run_loop(tiny_settings, write_jsonl(tmp_path / "second.jsonl", events[160:]))  # a restart
    after = read_points(history)
    assert after[: len(before)] == before and len(after) > len(before)
    assert after[-1].events > before[-1].events  # the restarted trainer went on from its checkpoint

    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base) as client:
        schema = status_schema(client)
        response = client.get("/v1/status")
        assert response.status_code == 200
        body = response.json()
        jsonschema.validate(body, schema)
        assert body["role"] == "colocated"
        assert [p["t"] for p in body["points"]] == [p.t for p in after]
        cut = after[len(before) - 1].t
        newer = client.get("/v1/status", params={"since": cut}).json()
        jsonschema.validate(newer, schema)
        assert [p["t"] for p in newer["points"]] == [p.t for p in after[len(before) :]]
        for bad in ("nan", "inf"):  # a review: NaN compared false with every point and hid them all
            assert client.get("/v1/status", params={"since": bad}).status_code == 422
        for bad in ("\x852", " 2", "1_000", "2 ", "0x10", ""):  # the fuzzer's NEL; float() takes them all but ""
            r = client.get("/v1/status", params={"since": bad})
            assert r.status_code == 422 and r.json()["error"]["code"], (bad, str(r.request.url), r.text[:200])
        assert client.get("/v1/status", params={"since": "1e3"}).status_code == 200

        registry = AdapterRegistry(tiny_settings.registry_dir)
        assert body["serving"]["version"] == registry.serving().version is not None
        assert [v["version"] for v in body["versions"]] == registry.versions()
        assert any(v["decision"] == "promoted" for v in body["versions"])
        snapshot = body["snapshot"]
        new = {label["label"]: label["new"] for label in snapshot["labels"]}
        assert new == {"alpha": False, "beta": False, "gamma": True}
        drift = [(d["detector"], d["stream"], d["index"]) for d in snapshot["drift"]]
        # Besides the one handed over, the label detector (on the label shares) may fire on this stream.
        assert [d for d in drift if d[1] != "label"] == [("ADWIN", "error", 77)]
        assert snapshot["dead_letter_counts"] == {"malformed_json": 1, "empty_label": 1}
        assert {d["reason"] for d in snapshot["dead_letters"]} == {"malformed_json", "empty_label"}
        assert all(d["text"] is None for d in snapshot["dead_letters"])  # a file source: texts are off

        text = response.text + json.dumps(newer) + client.get("/").text + client.get("/console/static/console.js").text
        for secret in (str(tmp_path), str(tiny_settings.state_dir), TOKEN, "secret complaint"):
            assert secret not in text

        shutil.rmtree(tiny_settings.state_dir / CONSOLE_DIR)  # no trainer files: a serving replica
        replica = client.get("/v1/status").json()
        jsonschema.validate(replica, schema)
        assert (replica["role"], replica["points"], replica["snapshot"]) == ("replica", [], None)
        assert replica["serving"]["version"] == body["serving"]["version"]


def two_tasks(n: int) -> list[dict[str, Any]]:
    """``n`` events of the default task (alpha, beta) and ``n`` of task ``intents`` (gamma, delta), interleaved."""
    default = keyword_events(n, ["alpha", "beta"], seed=7, prefix="d")
    intents = [{**row, "task": "intents"} for row in keyword_events(n, ["gamma", "delta"], seed=8, prefix="i")]
    return [row for pair in zip(default, intents, strict=True) for row in pair]


def test_status_shows_the_task_asked_for(tiny_settings: Settings, tmp_path: Path) -> None:
    """A probe found the console's task selector changed nothing: /v1/status took no task, so the
    labels, versions and serving badge were the default task's whichever was picked."""
    tiny_settings.trainer.batch_size = 8
    run_loop(tiny_settings, write_jsonl(tmp_path / "tasks.jsonl", two_tasks(160)))
    registries = {
        name: AdapterRegistry(task_registry_dir(tiny_settings.registry_dir, name)) for name in ("default", "intents")
    }
    assert registries["intents"].versions(), "the named task published nothing to show"
    registries["intents"].promote(registries["intents"].versions()[0], "test: serve the first", pin=True)

    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base) as client:
        schema = status_schema(client)
        default = client.get("/v1/status").json()
        assert client.get("/v1/status", params={"task": "default"}).json()["labels"] == default["labels"]
        intents = client.get("/v1/status", params={"task": "intents"}).json()
        for body, name, labels in ((default, "default", {"alpha", "beta"}), (intents, "intents", {"gamma", "delta"})):
            jsonschema.validate(body, schema)
            registry = registries[name]
            assert (body["task"], body["tasks"]) == (name, ["default", "intents"])
            assert {label["label"] for label in body["labels"]} == labels, name
            assert sum(label["count"] for label in body["labels"]) > 0, name
            assert [v["version"] for v in body["versions"]] == registry.versions(), name
            assert body["serving"]["version"] == registry.serving().version, name
            assert body["serving"]["pinned"] == registry.serving().pinned, name
            assert [c["version"] for c in body["serving_changes"]][-1:] == [registry.serving().version], name
            assert body["task_stat"]["task"] == name and body["task_stat"]["events"] > 0, name
            assert body["snapshot"]["task_labels"] == {}  # only the task asked for is sent, as `labels`
        assert intents["serving"]["pinned"] and not default["serving"]["pinned"]
        assert intents["points"] == default["points"]  # the curves are the trainer's, whichever task

        unknown = client.get("/v1/status", params={"task": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_task"
        assert "known tasks: default, intents" in unknown.json()["error"]["message"]
        for bad in ("", " ", "\u200b"):  # blank
            r = client.get("/v1/status", params={"task": bad})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (bad, r.text)
        repeated = client.get("/v1/status", params=[("task", "default"), ("task", "intents")])
        assert repeated.status_code == 422 and repeated.json()["error"]["code"] == "invalid_request"
        operation = client.get("/openapi.json").json()["paths"]["/v1/status"]["get"]
        task = next(p for p in operation["parameters"] if p["name"] == "task")
        assert (task["in"], task["required"], task["schema"]["default"]) == ("query", False, "default")
        assert {"404", "422"} <= set(operation["responses"])


def test_records_the_daemon_rejects_are_told_in_the_log_by_reason_with_why(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file of records without ids (the shape of many public datasets) was dead-lettered whole
    while the log said nothing but "events 0"."""
    rows: list[object] = [{"text": f"text {i}", "label": "a"} for i in range(12)]
    rows += [{"id": "n-1", "text": "t", "label": 7}, *keyword_events(20, ["alpha", "beta"], seed=5)]
    with caplog.at_level(logging.WARNING, logger="dynft"):
        run_loop(tiny_settings, write_jsonl(tmp_path / "no-ids.jsonl", rows))
    told = [r.getMessage() for r in caplog.records if "dead-lettered since the last status line" in r.getMessage()]
    counts: Counter[str] = Counter()
    for message in told:
        found = re.search(r"status line \(([^)]*)\)", message)  # "(missing_field 12, wrong_type 1)"
        assert found is not None, message
        reasons = found.group(1)
        counts.update({reason: int(n) for reason, n in (part.split() for part in reasons.split(", "))})
        assert f"to {tiny_settings.dead_letter_path}; the newest: " in message
    assert counts == {"missing_field": 12, "wrong_type": 1}, told
    assert any("(id: Field required)" in m or "(label: Input should be a valid string)" in m for m in told)


def test_the_page_and_its_files_are_served_and_nothing_else(tiny_settings: Settings) -> None:
    with running_server(tiny_settings) as (base, _), httpx.Client(base_url=base) as client:
        for path in ("/", "/console"):
            page = client.get(path)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert 'id="chart-accuracy"' in page.text and "/console/static/console.js" in page.text
            assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
        assert client.get("/console/static/console.css").headers["content-type"].startswith("text/css")
        for name in ("console.html", "..%2F..%2Fsettings.py", "history.py"):
            assert client.get(f"/console/static/{name}").status_code == 404


def test_console_show_texts_is_on_for_the_demo_only_unless_set() -> None:
    from dynft.settings import load_settings

    assert load_settings().console_show_texts  # the demo stream's texts are a public dataset
    assert not load_settings(overrides={"source.uri": "file:x.jsonl"}).console_show_texts
    assert load_settings(overrides={"source.uri": "file:x.jsonl", "server.console_show_texts": True}).console_show_texts
    assert not load_settings(overrides={"server.console_show_texts": False}).console_show_texts


def test_a_history_the_disk_refuses_costs_the_console_not_the_training(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tiny_settings.state_dir / CONSOLE_DIR
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the console directory should be")  # every write below it fails
    events = keyword_events(160, ["alpha", "beta"], seed=5)
    with caplog.at_level(logging.WARNING, logger="dynft.history"):
        loop = run_loop(tiny_settings, write_jsonl(tmp_path / "events.jsonl", events))
    assert loop.trainer.steps > 0 and loop.prequential.seen > 100
    refusals = [r for r in caplog.records if "console history cannot be written" in r.getMessage()]
    assert len(refusals) == 1  # once, not at every status interval
    assert blocked.read_text() == "a file where the console directory should be"
