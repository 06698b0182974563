from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from dynft.events import Event
from dynft.model import AdapterSlots, AdapterState, build_model, peft_config_from_dict
from dynft.registry import AdapterRegistry
from dynft.serving.server import Server
from dynft.settings import Settings
from dynft.trainer import OnlineTrainer

from helpers import keyword_events

PROBE = "w7 alpha2 w9 beta1"
TOKEN = "test-admin-token"


def perturbed(state: AdapterState, k: int, head_keys: set[str]) -> AdapterState:
    """Version k: the trained adapter with its first label's bias shifted, so every version answers differently."""
    tensors = {key: t.clone() for key, t in state.tensors.items()}
    bias = next(key for key in head_keys if tensors[key].dim() == 1)
    tensors[bias][0] += 0.15 * k
    return AdapterState(tensors, list(state.labels), dict(state.peft_config))


@pytest.fixture
def versions(tiny_trainer: OnlineTrainer, tiny_settings: Settings) -> dict[int, AdapterState]:
    """25 published versions: 1-12 know two labels, 13-25 three (the head grows mid-way)."""
    registry = AdapterRegistry(tiny_settings.registry_dir, keep_last=100)
    out: dict[int, AdapterState] = {}
    for phase, labels in ((range(1, 13), ["alpha", "beta"]), (range(13, 26), ["alpha", "beta", "gamma"])):
        stream = [Event(**r) for r in keyword_events(320, labels, seed=len(labels))]
        for i in range(0, len(stream), 16):
            tiny_trainer.step(tiny_trainer.collator(stream[i : i + 16], n_fresh=16))
        trained = tiny_trainer.export()
        for k in phase:
            state = perturbed(trained, k, tiny_trainer.slots.head_keys)
            assert registry.publish(state, {"step": k}).version == k
            out[k] = state
    return out


def reference_outputs(settings: Settings, states: dict[int, AdapterState], text: str) -> dict[int, dict[str, float]]:
    """What each version must answer for ``text``, computed on a separate model instance."""
    from dynft.model import load_tokenizer, resolve_model_path

    path = resolve_model_path(settings.model.path)
    tokenizer = load_tokenizer(path)
    first = next(iter(states.values()))
    model = build_model(path, peft_config_from_dict(first.peft_config), 1, torch.device("cpu"), tokenizer.pad_token_id)
    slots = AdapterSlots(model)
    model.eval()
    out = {}
    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=settings.model.max_length)
    for version, state in states.items():
        slots.install(slots.prepare(state))
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0, : len(state.labels)], dim=-1).tolist()
        out[version] = dict(zip(state.labels, probs, strict=True))
    return out


@contextmanager
def running_server(settings: Settings) -> Iterator[tuple[str, Server]]:
    """A real dynft server on a free loopback port, in a thread; stopped afterwards."""
    settings.server.admin_token = TOKEN  # type: ignore[assignment]
    settings.server.poll_interval_s = 0.02
    server = Server(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, args=(sock,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.stop()
        thread.join(30)
        sock.close()


def wait_for_version(base: str, version: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base) as client:
        while time.monotonic() < deadline:
            r = client.post("/v1/predict", json={"texts": [PROBE]})
            if r.status_code == 200 and r.json()["adapter_version"] == version:
                return
            time.sleep(0.02)
    raise AssertionError(f"the server never answered with version {version}")


@pytest.fixture
def state_dir(tiny_settings: Settings) -> Path:
    return tiny_settings.state_dir
