"""From a ``Run`` to the figures of the report: prequential accuracy and macro-F1, forgetting,
recovery after drift, drift detection delay and false alarms.

Definitions (``R[j][i]``: accuracy on phase i's test slice after learning phase j; the run
measures ``R[i][i]`` right after each phase and ``R[T][i]`` at the end):

- *backward transfer* ``BWT = mean over i < T of (R[T][i] - R[i][i])``: negative when earlier
  phases were forgotten; *forgetting* is ``-BWT``;
- *recovery* after a drift point: the fewest events ``r`` after it such that the accuracy over
  the ``window`` events that follow them is back within ``tolerance`` of the accuracy over the
  ``window`` events before the drift point (0: no measurable drop); ``None`` when that does
  not happen before the next drift point;
- a *detection* is on time when it falls within ``horizon`` events after a drift point (and
  before the next one); its *delay* is the distance. Other detections are *false alarms*.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from benchmarks.quality.methods import Run


def correct(run: Run) -> list[bool]:
    return [p == t for p, t in zip(run.predictions, run.truths, strict=True)]


def accuracy(run: Run) -> float:
    hits = correct(run)
    return sum(hits) / max(1, len(hits))


def macro_f1(truths: list[str], predictions: list[str | None]) -> float:
    """Mean F1 over the labels of ``truths`` (a missing prediction is wrong)."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for t, p in zip(truths, predictions, strict=True):
        if p == t:
            tp[t] += 1
        else:
            fn[t] += 1
            if p is not None:
                fp[p] += 1
    labels = set(truths)
    scores = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) if tp[c] else 0.0 for c in labels]
    return sum(scores) / max(1, len(scores))


def curve(run: Run, window: int, every: int) -> list[tuple[int, float]]:
    """(stream index, rolling accuracy over the last ``window`` predictions), every ``every`` predictions."""
    hits = correct(run)
    out = []
    total = 0
    for k, hit in enumerate(hits):
        total += hit
        if k >= window:
            total -= hits[k - window]
        if k + 1 >= min(window, len(hits)) and (k % every == 0 or k == len(hits) - 1):
            out.append((run.positions[k], total / min(window, k + 1)))
    return out


def backward_transfer(run: Run) -> float | None:
    pairs = [(end, final) for end, final in zip(run.phase_end[:-1], run.final[:-1], strict=True) if end is not None]
    if not pairs:
        return None
    return sum(final - end for end, final in pairs) / len(pairs)


def recovery(run: Run, drift_points: list[int], window: int, tolerance: float = 0.02) -> list[int | None]:
    """Events after each drift point until the accuracy is back near its pre-drift level (see above)."""
    hits = correct(run)
    out: list[int | None] = []
    bounds = [*drift_points[1:], max(run.positions, default=0) + 1]
    for point, bound in zip(drift_points, bounds, strict=True):
        before = [h for pos, h in zip(run.positions, hits, strict=True) if pos < point][-window:]
        after = [(pos, h) for pos, h in zip(run.positions, hits, strict=True) if point <= pos < bound]
        w = min(window, len(before), len(after))
        if not w:
            out.append(None)
            continue
        level = sum(before[-w:]) / w - tolerance
        running = sum(h for _, h in after[:w])
        found = None
        for k in range(w, len(after) + 1):  # after[k - w : k] is the window
            if k > w:
                running += after[k - 1][1] - after[k - w - 1][1]
            if running / w >= level:
                found = after[k - w][0] - point  # the window starts this many events after the drift point
                break
        out.append(found)
    return out


def detection(run: Run, drift_points: list[int], horizon: int, end: int) -> dict[str, Any]:
    """Delay of the first on-time detection of each drift point, and the false alarms."""
    positions = sorted(d["position"] for d in run.detections)
    bounds = [*drift_points[1:], end]
    delays: list[int | None] = []
    on_time: set[int] = set()
    for point, bound in zip(drift_points, bounds, strict=True):
        hits = [p for p in positions if point <= p < min(point + horizon, bound)]
        on_time.update(hits)
        delays.append(hits[0] - point if hits else None)
    return {"delays": delays, "false_alarms": sum(p not in on_time for p in positions), "detections": len(positions)}


def summarize(run: Run, drift_points: list[int], window: int, horizon: int, end: int) -> dict[str, Any]:
    """Every figure of one run, JSON-ready."""
    bwt = backward_transfer(run)
    return {
        "method": run.method,
        "prequential_accuracy": accuracy(run),
        "prequential_macro_f1": macro_f1(run.truths, run.predictions),
        "phase_end_accuracy": run.phase_end,
        "final_accuracy": run.final,
        "backward_transfer": bwt,
        "forgetting": None if bwt is None else -bwt,
        "recovery_events": recovery(run, drift_points, window),
        "detection": detection(run, drift_points, horizon, end) if run.method.startswith("dynft") else None,
        "events_per_s": run.events / run.seconds if run.seconds > 0 else None,
        "seconds": run.seconds,
        "events": run.events,
        "trained": run.trained,
        "extra": run.extra,
    }
