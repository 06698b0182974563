"""A full state disk, produced for real (a 16 MiB tmpfs filled to the last byte), while the
trainer runs beside a server: intake pauses, nothing is dead-lettered for it, and everything
proceeds once space returns.

Where this process may not mount, the test is skipped with the reason (``mounted``); it never
falls back to a mock. A full disk is no record's fault: while the state directory refuses
writes, the batching thread takes nothing from the intake (whose queue fills and pauses the
source), the refused writes are retried with backoff, and the records that arrived meanwhile
end trained, held out or dead-lettered for their own reasons once the disk takes writes again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from dynft.deadletter import read_dead_letters
from dynft.events import REASONS
from dynft.ledger import Ledger
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from helpers import keyword_events
from serving.conftest import PROBE, TOKEN, running_server
from test_state_faults import (
    LABELS,
    fill,
    follow_with_frequent_writes,
    mounted,
    processed,
    sample,
    start_trainer,
    wait_until,
)

HOSTILE_EVERY = 10  # of the events fed while the disk is full, every 10th has an empty text


def rejected(metrics: CollectorRegistry) -> dict[str, float]:
    values = {r: metrics.get_sample_value("dynft_events_rejected_total", {"reason": r}) or 0.0 for r in REASONS}
    return {r: v for r, v in values.items() if v}


@pytest.mark.slow
def test_a_full_disk_pauses_intake_dead_letters_nothing_for_it_and_everything_proceeds_once_freed(
    tiny_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with mounted(tmp_path / "state", "-t", "tmpfs", "-o", "size=16m", "tmpfs") as state:
        s = tiny_settings
        s.state_dir = state
        stream = tmp_path / "stream.jsonl"  # the input is not on the full disk
        stream.touch()
        follow_with_frequent_writes(s, stream)
        s.source.queue_size = 64
        s.checkpoint.disk_full_retry_max_s = 1.0
        rows = keyword_events(1000, LABELS, seed=3)
        hostile = {i for i in range(400, 1000) if i % HOSTILE_EVERY == 0}
        for i in hostile:
            rows[i]["text"] = ""

        def feed(start: int, stop: int) -> None:
            with open(stream, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows[start:stop])

        metrics = CollectorRegistry()
        loop, thread = start_trainer(s, metrics)
        registry = AdapterRegistry(s.registry_dir)
        try:
            feed(0, 400)
            wait_until(lambda: processed(metrics) == 400, "the first 400 events are processed")
            time.sleep(1.0)  # the main loop finishes the publish and checkpoint of its last step; then it idles
            free_before = sample(metrics, "dynft_state_disk_free_bytes")
            assert 0 < free_before <= 16 << 20, free_before
            serving = registry.serving().version
            assert serving is not None and sample(metrics, "dynft_intake_paused") == 0
            with running_server(s.model_copy(deep=True)) as (base, _), httpx.Client(base_url=base, timeout=30) as http:
                wait_until(lambda: http.get("/readyz").status_code == 200, "the server loads the serving version")

                filler = fill(state)
                feed(400, 1000)
                wait_until(lambda: sample(metrics, "dynft_intake_paused") == 1, "intake pauses on the full disk")
                wait_until(
                    lambda: sample(metrics, "dynft_intake_queue_events") == s.source.queue_size,
                    "the intake queue fills: nothing drains it, so the source is paused",
                )
                errors = sample(metrics, "dynft_checkpoint_errors_total")
                wait_until(lambda: sample(metrics, "dynft_checkpoint_errors_total") >= errors + 2, "two retries")
                done = processed(metrics)  # what was under way when the disk filled is complete by now
                errors = sample(metrics, "dynft_checkpoint_errors_total")
                wait_until(lambda: sample(metrics, "dynft_checkpoint_errors_total") >= errors + 2, "two more retries")
                assert processed(metrics) == done < 1000, "records were taken while the disk was full"
                assert thread.is_alive() and loop.intake is not None and loop.intake.paused
                assert set(rejected(metrics)) <= {"empty_text"}, "a record was dead-lettered for the full disk"
                wait_until(
                    lambda: sample(metrics, "dynft_state_disk_free_bytes") < free_before / 4,
                    "the disk-free gauge shows the disk full",
                )
                r = http.post("/v1/predict", json={"texts": [PROBE]})
                assert r.status_code == 200 and r.json()["adapter_version"] == serving
                r = http.post(f"/v1/adapters/{serving}/promote", headers={"Authorization": f"Bearer {TOKEN}"})
                assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unwritable", r.text
                assert "No space left on device" not in r.json()["error"]["message"]  # the details are logged
                errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                checkpoint_lines = [m for m in errors_logged if m.startswith("checkpoint failed")]
                assert checkpoint_lines, errors_logged
                for line in checkpoint_lines:  # one line each, with the path and the reason
                    assert str(state) in line and "\n" not in line and "intake paused" in line, line
                    assert "No space left on device" in line or "database or disk is full" in line, line

                written = sample(metrics, "dynft_checkpoints_total")
                filler.unlink()
                wait_until(lambda: processed(metrics) == 1000, "everything is processed once space returns")
                wait_until(lambda: sample(metrics, "dynft_intake_paused") == 0, "intake resumes")
                wait_until(
                    lambda: sample(metrics, "dynft_checkpoints_total") > written, "a checkpoint after space frees"
                )
                assert sample(metrics, "dynft_state_disk_free_bytes") > free_before / 4
                s.registry.publish_interval_s = 1.0  # the rest of the stream may be too short for 15 steps
                wait_until(lambda: registry.versions()[-1] > serving, "a version after space frees")
                newest = registry.versions()[-1]
                wait_until(
                    lambda: http.post("/v1/predict", json={"texts": [PROBE]}).json()["adapter_version"] >= newest,
                    "the server swaps to the version written after the disk recovered",
                )
        finally:
            loop.should_exit.set()
            thread.join(120)
        assert not thread.is_alive()
        # Every record ended for its own reason: the hostile ones dead-lettered once each, as
        # empty_text; every other one trained, held out or skipped, and in the ledger.
        assert rejected(metrics) == {"empty_text": len(hostile)}
        entries = read_dead_letters(s.dead_letter_path)
        assert sorted(e["origin"]["line"] - 1 for e in entries) == sorted(hostile)
        assert {e["reason"] for e in entries} == {"empty_text"}
        ledger = Ledger(state / "ledger.db")
        try:
            counts = ledger.counts()
            found = ledger.lookup(r["id"] for i, r in enumerate(rows) if i not in hostile)
        finally:
            ledger.close()
        assert counts["dead_lettered"] == len(hostile)
        assert counts["trained"] + counts["held_out"] + counts["skipped"] == 1000 - len(hostile)
        assert not [i for i, (status, _) in found.items() if status == "unseen"]
