"""The embedded default, as the README runs it: packaged MiniLM, demo stream, CPU."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port
from test_cli import metric

REQUIRED = [
    "dynft_events_total",
    "dynft_buffer_events",
    "dynft_train_steps_total",
    "dynft_train_step_seconds_bucket",
    "dynft_train_loss",
    "dynft_prequential_accuracy",
    "dynft_drift_detections_total",
    "dynft_adapter_versions_total",
    "dynft_serving_version",
    "dynft_swap_seconds_bucket",
    "dynft_predict_seconds_bucket",
    "dynft_requests_total",
]


@pytest.mark.slow
def test_the_default_daemon_learns_the_demo_stream_within_three_minutes(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "dynft", "run", "--port", str(port), "--state-dir", str(tmp_path / "state")]
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    started = time.monotonic()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            text, answered = "", False
            while time.monotonic() - started < 180:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(2)
                try:
                    answered = client.post("/v1/predict", json={"texts": ["my card has not arrived yet"]}).is_success
                    text = client.get("/metrics").text
                except httpx.HTTPError:
                    continue
                accuracy = metric(text, "dynft_prequential_accuracy")
                majority = metric(text, "dynft_prequential_majority_rate")
                if answered and metric(text, "dynft_swaps_total") >= 2 and accuracy > majority > 0:
                    break
            elapsed = time.monotonic() - started
            assert answered, log_path.read_text()[-3000:]
            assert metric(text, 'dynft_adapter_versions_total{decision="promoted"}') >= 2
            assert metric(text, "dynft_swaps_total") >= 2
            assert metric(text, "dynft_prequential_accuracy") > metric(text, "dynft_prequential_majority_rate")
            for name in REQUIRED:
                assert name in text, name
            answer = client.post("/v1/predict", json={"texts": ["my card has not arrived yet"]}).json()
            print(f"default demo: ready after {elapsed:.0f} s; answer {answer['predictions'][0]['label']}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert elapsed < 180
