"""Hot swap under load: every response is exactly what the version it names computes."""

from __future__ import annotations

import random
import threading
import time

import httpx

from dynft.model import AdapterState
from dynft.registry import AdapterRegistry
from dynft.settings import Settings

from serving.conftest import PROBE, reference_outputs, running_server, wait_for_version

CLIENTS, REQUESTS_EACH = 8, 250


def test_2000_requests_across_20_swaps_fail_none_and_never_mix_versions(
    tiny_settings: Settings, versions: dict[int, AdapterState]
) -> None:
    expected = reference_outputs(tiny_settings, versions, PROBE)
    # The test can only tell versions apart if their answers differ by far more than the tolerance.
    values = [list(v.values()) for v in expected.values()]
    assert (
        min(max(abs(a - b) for a, b in zip(x, y, strict=False)) for i, x in enumerate(values) for y in values[i + 1 :])
        > 1e-3
    )

    registry = AdapterRegistry(tiny_settings.registry_dir, keep_last=100)
    registry.promote(1, "start")
    with running_server(tiny_settings) as (base, server):
        wait_for_version(base, 1)
        failures: list[str] = []
        answers: list[tuple[int, dict[str, float]]] = []
        done = threading.Event()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=base, timeout=30) as http:
                for _ in range(REQUESTS_EACH):
                    # The probe alone or with company, so it lands in micro-batches of every size and padding.
                    extra = [f"w{rng.randrange(60)} gamma{rng.randrange(4)} w3" for _ in range(rng.randrange(4))]
                    texts = [PROBE, *extra] if rng.random() < 0.5 else [*extra, PROBE]
                    try:
                        r = http.post("/v1/predict", json={"texts": texts})
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                        continue
                    body = r.json()
                    probe = body["predictions"][texts.index(PROBE)]
                    answers.append((body["adapter_version"], probe["scores"]))

        def swapper() -> None:
            order = list(range(2, 26)) + list(range(24, 0, -1))  # grow the head, then shrink it again
            i = 0
            while not done.is_set():
                registry.promote(order[i % len(order)], "swap test")
                i += 1
                time.sleep(0.05)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(CLIENTS)]
        swapping = threading.Thread(target=swapper)
        swapping.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        done.set()
        swapping.join(30)
        swaps = server.metrics_registry.get_sample_value("dynft_swaps_total") or 0

    assert failures == []
    assert len(answers) == CLIENTS * REQUESTS_EACH
    assert swaps >= 20, f"only {swaps} swaps happened during the load"
    seen = {version for version, _ in answers}
    assert len(seen) >= 10
    for version, scores in answers:
        want = expected[version]
        assert scores.keys() == want.keys(), f"v{version} answered with another label set"
        worst = max(abs(scores[k] - want[k]) for k in want)
        assert worst < 1e-4, f"a response naming v{version} differs from v{version} by {worst}"
