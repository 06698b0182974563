"""Schema-driven fuzzing of the HTTP API (schemathesis), over a real socket, and what it found.

What ``test_the_api_holds_to_its_own_schema`` proves: schemathesis (its CLI, as users run it)
reads dynft's own ``/openapi.json`` from a real server (uvicorn on a loopback port, the tiny
model, three published versions) and sends every operation the requests of its coverage phase
(boundary values, missing and wrong-typed fields, unexpected methods, requests without the
token) and its fuzzing phase, valid and invalid, once with the admin bearer token and once
without. Every response must pass all of schemathesis's checks (no 5xx; documented status
codes, content types and bodies; valid requests accepted, invalid ones rejected; admin
endpoints refusing requests without the token) and dynft's own: an error is a 4xx whose body
is exactly ``{"error": {"code", "message"}}``. The run must have tested every operation, and
the server must have counted at least as many requests as schemathesis reports sending, so it
cannot pass without fuzzing anything.

The tests after it pin down what the fuzzer and a review of the request path found, including
inputs schemathesis does not generate (unpaired surrogates, bodies that are not UTF-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynft.events import Event
from dynft.registry import AdapterRegistry
from dynft.serving.answers import Answer
from dynft.serving.server import Server
from dynft.settings import load_settings
from dynft.trainer import build_trainer

from helpers import keyword_events
from serving.conftest import PROBE, TOKEN, running_server, wait_for_version

pytestmark = pytest.mark.slow
OPERATIONS = 10  # predict, tasks, adapters, promote, rollback, unpin, healthz, readyz, metrics, status
MAX_EXAMPLES = 60  # per operation in the fuzzing phase: both runs take about a minute on 2 cores

# dynft's error contract as a schemathesis check, loaded by the CLI through SCHEMATHESIS_HOOKS.
HOOKS = '''
import json

import schemathesis


@schemathesis.check
def dynft_error_shape(ctx, response, case):
    """An error is a 4xx with the body {"error": {"code": "...", "message": "..."}}, nothing else."""
    if response.status_code < 400:
        return None
    assert response.status_code < 500, f"server error {response.status_code}"
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"an error sent as {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, f"error body {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, f"error body {body!r}"
    assert all(isinstance(v, str) and v for v in error.values()), f"error body {body!r}"
    return True
'''


@pytest.fixture(scope="module")
def live_api(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server]]:
    """A real server with three versions published and version 1 serving, shared by the module."""
    settings = load_settings(
        overrides={
            "state_dir": str(tmp_path_factory.mktemp("fuzz") / "state"),
            "model.path": str(tiny_model_dir),
            "model.max_length": 32,
            "trainer.threads": 1,
            # Small limits, so that generated requests reach them (and their boundaries) quickly.
            "server.max_batch": 8,
            "server.max_texts": 4,
            "server.max_body_bytes": 4096,
            "events.max_text_chars": 100,
        }
    )
    trainer = build_trainer(settings.model, settings.adapter, settings.trainer)
    events = [Event(**r) for r in keyword_events(16, ["alpha", "beta", "gamma"])]
    trainer.step(trainer.collator(events, n_fresh=16))  # the head learns its labels
    registry = AdapterRegistry(settings.registry_dir)
    for step in range(3):
        registry.publish(trainer.export(), {"step": step})
    registry.promote(1, "fuzzing")
    with running_server(settings) as (base, server):
        wait_for_version(base, 1)
        yield base, server


def requests_seen(server: Server) -> float:
    """Requests the server counted, whatever their status."""
    return sum(
        sample.value
        for metric in server.metrics_registry.collect()
        for sample in metric.samples
        if sample.name == "dynft_requests_total"
    )


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"]
    return str(body["error"]["code"])


@pytest.mark.parametrize("auth", ["with-token", "without-token"])
def test_the_api_holds_to_its_own_schema(live_api: tuple[str, Server], auth: str, tmp_path: Path) -> None:
    base, server = live_api
    hooks = tmp_path / "dynft_hooks.py"
    hooks.write_text(HOOKS)
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json"),
        *("--checks", "all", "--mode", "all", "--max-examples", str(MAX_EXAMPLES)),
        *("--phases", "examples,coverage,fuzzing", "--request-timeout", "30", "--no-color"),
        *("--generation-database", "none"),  # nothing kept between runs: each run explores afresh
        *("--report", "json", "--report-dir", str(tmp_path / "report")),
        *(("-H", f"Authorization: Bearer {TOKEN}") if auth == "with-token" else ()),
    ]
    before = requests_seen(server)
    run = subprocess.run(
        command,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(hooks)},
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = list((tmp_path / "report").glob("json-*.json"))
    assert run.returncode == 0 and len(reports) == 1, f"schemathesis found problems:\n{run.stdout[-12000:]}{run.stderr}"
    report: dict[str, Any] = json.loads(reports[0].read_text())
    assert report["failures"] == [] and report["errors"] == [], report
    assert report["operations"]["total"] == report["operations"]["tested"] == OPERATIONS, report["operations"]
    generated = report["test_cases"]["generated"]
    assert generated >= 20 * OPERATIONS, f"only {generated} requests generated"
    assert requests_seen(server) - before >= generated, "the server did not see the requests schemathesis sent"
    if auth == "without-token":  # every admin call was refused: schemathesis could not get past the 401
        assert sorted(report["warnings"]["missing_auth"]) == [
            "POST /v1/adapters/rollback",
            "POST /v1/adapters/unpin",
            "POST /v1/adapters/{version}/promote",
        ]


def test_unpaired_surrogates_are_refused_with_a_422(live_api: tuple[str, Server]) -> None:
    """JSON may spell them (``"\\ud800"``) but the tokenizer cannot take them: this was a 500."""
    base, _ = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        body = b'{"texts": ["fine", "bad \\ud800 text"]}'
        r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422 and error_code(r) == "invalid_text", r.text
        assert "texts[1]" in r.json()["error"]["message"]
        assert client.post("/v1/predict", json={"texts": [PROBE]}).status_code == 200


def test_a_failing_request_fails_alone_not_the_micro_batch_it_shared(live_api: tuple[str, Server]) -> None:
    """A text the model cannot take (here one that bypassed the API's checks) used to fail every
    request of its micro-batch; now only its own request fails and the others get their answers."""
    _, server = live_api
    engine, s = server.engine, server.settings.server
    s.max_wait_ms = 300  # long enough for the three requests to share one batch
    try:
        futures = [engine.submit(["w1 alpha1"]), engine.submit(["\ud800"]), engine.submit(["w2 beta2", PROBE])]
        good_1, bad, good_2 = (f.exception(timeout=30) for f in futures)
        assert good_1 is None and good_2 is None and bad is not None
        answers: list[Answer] = [futures[0].result(), futures[2].result()]
        assert [len(a.predictions) for a in answers] == [1, 2]
    finally:
        s.max_wait_ms = 2.0
    assert engine.ready


def test_a_request_that_times_out_does_not_stop_inference(live_api: tuple[str, Server]) -> None:
    """A request that timed out (504) left a cancelled future, and setting its result killed the
    inference thread: every later request waited for its timeout. Now the worker skips it."""
    base, server = live_api
    s = server.settings.server
    s.request_timeout_s = 1e-6
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            statuses = [client.post("/v1/predict", json={"texts": [PROBE]}).status_code for _ in range(5)]
            assert 504 in statuses, statuses
            s.request_timeout_s = 10.0
            r = client.post("/v1/predict", json={"texts": [PROBE]})
            assert r.status_code == 200, r.text
    finally:
        s.request_timeout_s = 30.0
    assert server.engine.ready


@pytest.mark.parametrize(
    "body,headers,status,code,says",
    [
        (b'{"texts": ["caf\xe9"]}', {"content-type": "application/json"}, 422, "invalid_request", "not valid UTF-8"),
        (
            b'{"texts": ' + b"[" * 1800 + b"]" * 1800 + b"}",
            {"content-type": "application/json"},
            422,
            "invalid_request",
            "nested too deeply",
        ),
        (b'{"texts": [', {"content-type": "application/json"}, 422, "invalid_request", "malformed JSON at character"),
        (
            b'{"texts": ["a"], "top_k": 1' + b"0" * 1000 + b"}",  # past Python's limit on integer digits (640 here)
            {"content-type": "application/json"},
            422,
            "invalid_request",
            "a number that cannot be read (integers have at most 640 digits)",
        ),
        (b'{"texts": ["a"]}', {}, 422, "invalid_request", "Content-Type: application/json"),
    ],
)
def test_bodies_that_do_not_parse_are_a_clear_422(
    live_api: tuple[str, Server], body: bytes, headers: dict[str, str], status: int, code: str, says: str
) -> None:
    """Bodies that FastAPI could not parse were a bare 400 "There was an error parsing the body"."""
    base, _ = live_api
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)  # the server runs in this process: its lowest, for a number that fits the body
    try:
        r = httpx.post(f"{base}/v1/predict", content=body, headers=headers, timeout=30)
    finally:
        sys.set_int_max_str_digits(limit)
    assert r.status_code == status and error_code(r) == code and says in r.json()["error"]["message"], r.text


def test_unknown_paths_and_methods_name_their_status(live_api: tuple[str, Server]) -> None:
    base, _ = live_api
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.get("/v2/nothing")
        assert r.status_code == 404 and error_code(r) == "not_found"
        r = client.delete("/v1/predict")
        assert r.status_code == 405 and error_code(r) == "method_not_allowed" and r.headers["allow"] == "POST"


def test_the_schema_declares_the_limits_the_server_enforces(live_api: tuple[str, Server]) -> None:
    base, server = live_api
    schema = httpx.get(f"{base}/openapi.json").json()
    texts = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert texts["maxItems"] == server.settings.server.max_texts
    assert texts["items"]["maxLength"] == server.settings.events.max_text_chars
    # Every route's 422 is the JSON error body the server sends, not FastAPI's default one.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "422" in operation["responses"]:
                body = operation["responses"]["422"]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, body)
    promote = schema["paths"]["/v1/adapters/{version}/promote"]["post"]
    assert promote["security"] == [{"HTTPBearer": []}]
    assert set(promote["responses"]) >= {"200", "401", "403", "404", "409"}
