"""The promotion gate: a candidate serves only if it is not worse than what serves now.

Both are scored on the same recent held-out events, which the candidate never trained on: the
whole window, or between full checks its newest ``gate.quick_events`` (``dynft.scoring``, which
also says why the comparison is with a *reference* version, the last one that passed the whole
window, rather than with whatever serves now). The candidate is promoted when its accuracy is at
least the reference's minus ``tolerance``. On a quick check (the newest ``gate.quick_events``
held-out events) a larger loss is put down to chance when a one-sided sign test on the events
only one of the two answered right gives p >= ``gate.significance`` and the loss is at most
``gate.max_chance_loss``: there one more wrong answer is 3 points, so a 1-point tolerance
rejected candidates as good as the reference by the luck of the draw (a served airline run
rejected 29 of 52 versions, ten in a row, and served one up to 20 s old; measured in
benchmarks/results/quality/README.md, "2026-12-05, a gate that tells a loss from noise"). Full
checks keep the strict rule, and only they move the reference (``dynft.scoring``), so what a
quick check lets through is at most ``max_chance_loss`` below a version that passed the whole
window, and is replaced by the next candidate that passes. The very first version is promoted
without a comparison (there is nothing to compare with), and so is every candidate when the
serving version cannot be loaded or nothing is held out (``evaluation.holdout_fraction = 0``:
the gate is off); while the serving version is pinned by an operator, nothing is. While too
few events are held out to judge (``gate.min_holdout``), a candidate that knows labels the
serving version does not is promoted: the serving version cannot answer them at all (cold
start, first labels of a phase); other candidates are then compared with the serving version
on the events trained since it was cut (``scope = "prequential"``,
``dynft.scoring.SinceServing``) once there are ``gate.min_holdout`` of them, and rejected before.

>>> from dynft.settings import GateSettings
>>> judge(0.80, 0.82, holdout=100, serving_version=3, pinned=False, settings=GateSettings(tolerance=0.01)).promote
False
>>> judge(0.81, 0.82, holdout=100, serving_version=3, pinned=False, settings=GateSettings(tolerance=0.01)).promote
True
>>> quick = dict(holdout=32, serving_version=3, pinned=False, settings=GateSettings(), scope="newest")
>>> judge(0.75, 0.81, chance=0.25, **quick).promote, judge(0.75, 0.81, chance=0.03, **quick).promote
(True, False)
>>> judge(0.66, 0.81, chance=0.09, **quick).promote  # more than gate.max_chance_loss
False
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
    chance: float | None = None  # how often a loss this size comes between equally good versions (sign test)

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
    chance: float | None = None,
) -> Decision:
    """Decide on a candidate given both accuracies on the same held-out window.

    ``unloadable``: why the serving version cannot be loaded (so cannot be scored); such a version
    is replaced, as nothing can serve it. ``gate_off``: nothing is held out
    (``evaluation.holdout_fraction = 0``), so every candidate is promoted. A pin beats both.
    ``new_labels``: labels the candidate knows and the serving version does not. ``reference``:
    the version ``serving`` is the accuracy of (default: the serving one); ``scope``: "window" or
    "newest" (events of the window judged). ``chance``: how often equally good versions differ
    by at least this much on these events (``dynft.scoring.chance_of_loss``).
    """
    reference = serving_version if reference is None else reference
    against = "serving" if reference == serving_version else f"version {reference}"
    on = {
        "window": "",
        "newest": f" on the newest {holdout} held-out events",
        "prequential": f" on the {holdout} events trained since it (the trainer's answers before learning each)",
    }[scope]

    def decide(promote: bool, reason: str) -> Decision:
        return Decision(promote, reason, candidate, serving, serving_version, holdout, reference, scope, chance)

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
        return decide(True, f"{held} held-out events, but it knows {new_labels} labels the serving version does not")
    if candidate is None or serving is None or too_few:
        return decide(False, f"only {holdout} held-out events, the gate needs {settings.min_holdout}")
    if candidate >= serving - settings.tolerance:
        return decide(True, f"accuracy {candidate:.3f} >= {against} {serving:.3f} - {settings.tolerance}{on}")
    below = f"accuracy {candidate:.3f} < {against} {serving:.3f} - {settings.tolerance}{on}"
    if chance is not None and by_chance(serving - candidate, chance, scope, settings):
        return decide(True, f"{below}, a loss chance explains (p = {chance:.3f} >= {settings.significance})")
    return decide(False, below if chance is None else f"{below} (p = {chance:.3f})")


def by_chance(loss: float, chance: float, scope: str, settings: GateSettings) -> bool:
    """Whether a loss beyond the tolerance is put down to chance: on a quick check only, within
    ``max_chance_loss``, and with a sign test's p at least ``significance``."""
    quick = scope == "newest" and 0 < settings.significance <= chance
    return quick and loss <= settings.max_chance_loss
