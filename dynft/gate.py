"""The promotion gate: a candidate serves only if it is not worse than what serves now.

Both are scored on the same recent held-out events, which the candidate never trained on: the
whole window, or between full checks its newest ``gate.quick_events`` (``dynft.scoring``, which
also says why the comparison is with a *reference* version, the last one that passed the whole
window, rather than with whatever serves now). The candidate is promoted when its accuracy is at
least the reference's minus ``tolerance``. The very first version is promoted without a comparison (there is
nothing to compare with), and so is every candidate when the serving version cannot be loaded
or nothing is held out (``evaluation.holdout_fraction = 0``: the gate is off); while the
serving version is pinned by an operator, nothing is. While too few events are held out to
judge (``gate.min_holdout``), a candidate that knows labels the serving version does not is
promoted: the serving version cannot answer them at all (cold start, first labels of a phase);
other candidates are then compared with the serving version on the events trained since it was
cut (``scope = "prequential"``, ``dynft.scoring.SinceServing``) once there are ``gate.min_holdout``
of them, and rejected before.

>>> from dynft.settings import GateSettings
>>> judge(0.80, 0.82, holdout=100, serving_version=3, pinned=False, settings=GateSettings(tolerance=0.01)).promote
False
>>> judge(0.81, 0.82, holdout=100, serving_version=3, pinned=False, settings=GateSettings(tolerance=0.01)).promote
True
>>> judge(None, None, holdout=5, serving_version=3, pinned=False, settings=GateSettings(), new_labels=2).promote
True
>>> judge(None, None, holdout=0, serving_version=3, pinned=False, settings=GateSettings(), unloadable="corrupt").reason
'serving version 3 cannot be loaded (corrupt)'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dynft.settings import GateSettings


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    candidate_accuracy: float | None
    serving_accuracy: float | None
    serving_version: int | None
    holdout_events: int
    reference_version: int | None = None  # whose accuracy ``serving_accuracy`` is (dynft.scoring)
    scope: str = "window"  # the events judged: the held-out window, its newest, or "prequential" (SinceServing)

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"

    def as_dict(self) -> dict[str, Any]:
        return {"decision": self.label, **asdict(self)}


def judge(
    candidate: float | None,
    serving: float | None,
    holdout: int,
    serving_version: int | None,
    pinned: bool,
    settings: GateSettings,
    unloadable: str | None = None,
    gate_off: bool = False,
    new_labels: int = 0,
    reference: int | None = None,
    scope: str = "window",
) -> Decision:
    """Decide on a candidate given both accuracies on the same held-out window.

    ``unloadable``: why the serving version cannot be loaded (so cannot be scored); such a version
    is replaced, as nothing can serve it. ``gate_off``: nothing is held out
    (``evaluation.holdout_fraction = 0``), so every candidate is promoted. A pin beats both.
    ``new_labels``: labels the candidate knows and the serving version does not. ``reference``:
    the version ``serving`` is the accuracy of (default: the serving one); ``scope``: "window" or
    "newest" (events of the window judged).
    """
    reference = serving_version if reference is None else reference
    against = "serving" if reference == serving_version else f"version {reference}"
    on = {
        "window": "",
        "newest": f" on the newest {holdout} held-out events",
        "prequential": f" on the {holdout} events trained since it (the trainer's answers before learning each)",
    }[scope]

    def decide(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, candidate, serving, serving_version, holdout, reference, scope)

    if serving_version is None:
        return decide(True, "first version: nothing serves yet")
    if pinned:
        why = f" (it cannot be loaded: {unloadable})" if unloadable else ""
        return decide(False, f"serving version {serving_version} is pinned by an operator{why}")
    if gate_off:
        return decide(True, "the gate is off (evaluation.holdout_fraction = 0)")
    if unloadable is not None:
        return decide(True, f"serving version {serving_version} cannot be loaded ({unloadable})")
    too_few = candidate is None or serving is None or holdout < settings.min_holdout
    if (too_few or scope == "prequential") and new_labels > 0:
        held = "too few" if scope == "prequential" else f"only {holdout}"
        said = f"{new_labels} label{'s' if new_labels != 1 else ''}"
        return decide(True, f"{held} held-out events, but it knows {said} the serving version does not")
    if candidate is None or serving is None or too_few:
        return decide(False, f"only {holdout} held-out events, the gate needs {settings.min_holdout}")
    if candidate >= serving - settings.tolerance:
        return decide(True, f"accuracy {candidate:.3f} >= {against} {serving:.3f} - {settings.tolerance}{on}")
    return decide(False, f"accuracy {candidate:.3f} < {against} {serving:.3f} - {settings.tolerance}{on}")
