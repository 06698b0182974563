"""The HTTP API over real sockets: predictions, errors, admin auth, health and metrics."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from serving.conftest import PROBE, TOKEN, reference_outputs, running_server, wait_for_version


@pytest.fixture
def api(tiny_settings: Settings, versions: dict[int, AdapterState]):  # type: ignore[no-untyped-def]
    tiny_settings.server.max_batch = 8
    tiny_settings.server.max_texts = 4
    tiny_settings.server.max_body_bytes = 4096
    tiny_settings.events.max_text_chars = 100
    tiny_settings.registry.keep_last = 100
    with running_server(tiny_settings) as (base, server), httpx.Client(base_url=base, timeout=30) as client:
        yield client, server, AdapterRegistry(tiny_settings.registry_dir, keep_last=100)


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return str(body["error"]["code"])


def test_not_ready_until_a_version_serves(api) -> None:  # type: ignore[no-untyped-def]
    client, _, registry = api
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 503 and error_of(r) == "not_ready"
    r = client.post("/v1/predict", json={"texts": ["hello"]})
    assert r.status_code == 503 and error_of(r) == "not_ready" and r.headers["retry-after"] == "1"
    registry.promote(3, "first")
    wait_for_version(str(client.base_url), 3)
    assert client.get("/readyz").json() == {"status": "ready", "adapter_version": 3, "tasks": {"default": 3}}


def test_probes_answer_head(api) -> None:  # type: ignore[no-untyped-def]
    """Load balancers that probe with HEAD get the status GET would give, and no body."""
    client, _, registry = api
    r = client.head("/healthz")
    assert r.status_code == 200 and r.content == b""
    assert client.head("/readyz").status_code == 503
    registry.promote(3, "first")
    wait_for_version(str(client.base_url), 3)
    r = client.head("/readyz")
    assert r.status_code == 200 and r.content == b""
    for page in ("/metrics", "/", "/console"):  # pages uptime checkers probe too (405 before)
        r = client.head(page)
        assert r.status_code == 200 and r.content == b"", page


def test_predict_answers_with_the_serving_version(api, tiny_settings: Settings, versions) -> None:  # type: ignore[no-untyped-def]
    client, _, registry = api
    registry.promote(20, "first")
    wait_for_version(str(client.base_url), 20)
    r = client.post("/v1/predict", json={"texts": [PROBE, "gamma1 w2"]})
    assert r.status_code == 200
    body = r.json()
    assert body["adapter_version"] == 20 and len(body["predictions"]) == 2
    want = reference_outputs(tiny_settings, {20: versions[20]}, PROBE)[20]
    got = body["predictions"][0]
    assert got["label"] == max(want, key=want.__getitem__)
    assert got["scores"].keys() == want.keys() and abs(sum(got["scores"].values()) - 1) < 1e-5
    top = client.post("/v1/predict", json={"texts": [PROBE], "top_k": 1}).json()["predictions"][0]
    assert list(top["scores"]) == [got["label"]]


@pytest.mark.parametrize(
    "payload,code",
    [
        ({"texts": []}, "invalid_request"),
        ({"texts": "just a string"}, "invalid_request"),
        ({"texts": [1, 2]}, "invalid_request"),
        ({"text": ["a"]}, "invalid_request"),
        ({"texts": ["a"], "top_k": 0}, "invalid_request"),
        ({"texts": ["a"], "top_k": True}, "invalid_request"),
        ({"texts": ["a"], "top_k": "2"}, "invalid_request"),
        ({"texts": ["a"], "top_k": 1.5}, "invalid_request"),
        ({"texts": ["a", "b", "c", "d", "e"]}, "too_many_texts"),
        ({"texts": ["  "]}, "empty_text"),
        ({"texts": ["\u200b\u200d\ufeff"]}, "empty_text"),  # zero-width characters and a BOM
        ({"texts": ["a", "\u0301\u0301\x01"]}, "empty_text"),  # combining marks with no base
        ({"texts": ["\u3164\u2800"]}, "empty_text"),  # a Hangul filler and the braille blank render as nothing
        ({"texts": ["x" * 101]}, "text_too_long"),
    ],
)
def test_bad_predict_requests_get_a_clear_4xx(api, payload: object, code: str) -> None:  # type: ignore[no-untyped-def]
    client, _, registry = api
    registry.promote(1, "first")
    wait_for_version(str(client.base_url), 1)
    r = client.post("/v1/predict", json=payload)
    assert r.status_code == 422
    assert error_of(r) == code


def test_malformed_json_and_oversized_bodies(api) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = api
    r = client.post("/v1/predict", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and error_of(r) == "invalid_request"
    r = client.post("/v1/predict", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r) == "body_too_large"

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r) == "body_too_large"
    assert client.get("/nope").status_code == 404


def test_a_trailing_slash_or_an_empty_task_gets_a_json_4xx_not_a_redirect(api) -> None:  # type: ignore[no-untyped-def]
    """Found by a review: ``POST /v1/predict/`` got a 307 to a URL built from the client's Host
    header, and ``?task=`` a 404 "unknown task 'default'; known tasks: default"."""
    client, _, _ = api
    r = client.post("/v1/predict/", json={"texts": ["hi"]}, headers={"host": "evil.example"})
    assert r.status_code == 404 and error_of(r) == "not_found" and "location" not in r.headers
    r = client.get("/v1/adapters", params={"task": ""})
    assert r.status_code == 422 and error_of(r) == "invalid_request" and "task" in r.json()["error"]["message"]


def test_admin_endpoints_need_the_token(api) -> None:  # type: ignore[no-untyped-def]
    client, _, registry = api
    registry.promote(1, "first")
    r = client.post("/v1/adapters/2/promote")
    assert r.status_code == 401 and error_of(r) == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/adapters/2/promote", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and error_of(r) == "forbidden"
    r = client.post("/v1/adapters/rollback", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/v1/adapters/2/promote", headers=auth)
    assert r.json() == {"serving": 2, "pinned": True}
    wait_for_version(str(client.base_url), 2)
    listing = client.get("/v1/adapters").json()
    assert listing["serving"] == 2 and listing["pinned"] and len(listing["versions"]) == 25
    assert client.post("/v1/adapters/99/promote", headers=auth).status_code == 404
    # Found by a probe: read as an int, "1_0" promoted version 10 and "2.0" or "+2" version 2.
    for loose in ("1_0", "2.0", "+2", "%202", "0x2", "-1", "9" * 31):
        r = client.post(f"/v1/adapters/{loose}/promote", headers=auth)
        assert r.status_code == 422 and error_of(r) == "invalid_request", loose
    assert client.post("/v1/adapters/000000000002/promote", headers=auth).json() == {"serving": 2, "pinned": True}
    assert client.post("/v1/adapters/rollback", headers=auth).json() == {"serving": 1, "pinned": True}
    wait_for_version(str(client.base_url), 1)
    assert client.post("/v1/adapters/unpin", headers=auth).json() == {"serving": 1, "pinned": False}
    assert client.post("/v1/adapters/rollback", headers=auth).status_code == 409


def test_metrics_endpoint_exposes_server_metrics(api) -> None:  # type: ignore[no-untyped-def]
    client, _, registry = api
    registry.promote(5, "first")
    wait_for_version(str(client.base_url), 5)
    client.post("/v1/predict", json={"texts": []})
    text = client.get("/metrics").text
    for name in (
        "dynft_requests_total",
        "dynft_predict_seconds_bucket",
        "dynft_swap_seconds_bucket",
        "dynft_swaps_total",
    ):
        assert name in text
    assert 'dynft_requests_total{status="422"} 1.0' in text
    assert "dynft_serving_version 5.0" in text


def test_a_broken_version_is_never_swapped_in(api, tiny_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    client, server, registry = api
    registry.promote(4, "first")
    wait_for_version(str(client.base_url), 4)
    weights = registry.path(6) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    # The registry refuses to promote it; write the pointer by hand as a buggy tool might.
    (tiny_settings.registry_dir / "serving.json").write_text(
        json.dumps({"version": 6, "pinned": False, "reason": "", "updated_at": "", "history": []})
    )
    deadline = time.monotonic() + 5
    while (server.metrics_registry.get_sample_value("dynft_swap_failures_total", {"reason": "unreadable"}) or 0) < 1:
        assert time.monotonic() < deadline, "the server did not notice the bad version"
        time.sleep(0.02)
    r = client.post("/v1/predict", json={"texts": [PROBE]})
    assert r.status_code == 200 and r.json()["adapter_version"] == 4  # still serving the last good one


def test_a_field_or_query_parameter_given_twice_is_refused_not_read_as_its_last_value(api) -> None:  # type: ignore[no-untyped-def]
    """Found by a probe: ``?task=nope&task=default`` promoted on ``default`` (a gateway that
    authorises by the first value would be passed by), and ``{"task": 1, "task": "intents"}``
    was answered by the last task; events refuse a field given twice the same way."""
    client, _, registry = api
    registry.promote(1, "first")
    wait_for_version(str(client.base_url), 1)
    auth = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    twice = [(b'{"texts": ["a"], "task": 1, "task": "default"}', "task"), (b'{"texts": [1], "texts": ["a"]}', "texts")]
    for body, key in twice:
        r = client.post("/v1/predict", content=body, headers=auth)
        assert r.status_code == 422 and error_of(r) == "invalid_request", r.text
        assert f"field '{key}' is given twice" in r.json()["error"]["message"]
    for method, path in [("POST", "/v1/adapters/2/promote"), ("GET", "/v1/adapters"), ("POST", "/v1/adapters/unpin")]:
        r = client.request(method, path, params=[("task", "nope"), ("task", "default")], headers=auth)
        assert r.status_code == 422 and error_of(r) == "invalid_request", (path, r.text)
        assert "query parameter 'task' is given twice" in r.json()["error"]["message"]
    assert registry.serving().version == 1 and not registry.serving().pinned
    r = client.post("/v1/predict", params={"task": "default"}, json={"texts": ["a"]})
    assert r.status_code == 422 and "takes its task in the body" in r.json()["error"]["message"]
    assert client.post("/v1/predict", params={"api-version": "1"}, json={"texts": ["a"]}).status_code == 200
    assert client.post("/v1/predict", json={"texts": ["a"], "task": "default"}).status_code == 200
