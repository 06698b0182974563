"""The live console: a read-only page at ``/`` and the JSON it polls, ``GET /v1/status``.

The page (``dynft/serving/static/``: HTML, CSS and a small script, no build step, nothing
fetched from elsewhere) asks for ``/v1/status?task=T&since=S`` every two seconds and gets only
the points newer than ``S``. The points and the snapshot come from the trainer's console files
(``dynft.history``); the versions timeline comes from task ``T``'s registry. The curves are the
trainer's (their accuracy the default task's); the labels, versions, serving pointer and task
figures are task ``T``'s. A server with no trainer files in its state directory is a
*replica*: it shows what it serves and answers, no curves.

Nothing here reveals a secret or a path: the JSON is built from named fields only, never from
exception texts or settings, and dead letters' texts are dropped unless
``server.console_show_texts`` is on. The admin actions are not on the page.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, BeforeValidator, Field

from dynft.errors import RegistryError
from dynft.events import DEFAULT_TASK
from dynft.history import (
    CONSOLE_DIR,
    HISTORY_FILE,
    SNAPSHOT_FILE,
    HistoryReader,
    LabelStat,
    Point,
    Snapshot,
    TaskStat,
    read_snapshot,
)
from dynft.metrics import ServerMetrics
from dynft.registry import AdapterRegistry
from dynft.serving.checks import unknown_task
from dynft.serving.engine import InferenceEngine
from dynft.serving.limits import ApiError
from dynft.serving.schemas import NOT_BLANK, error_responses, is_blank
from dynft.serving.watcher import Lane
from dynft.settings import Settings

STATIC = {"console.js": "text/javascript", "console.css": "text/css"}  # the files the page loads


class VersionMark(BaseModel):
    version: int
    t: float | None = Field(description="when it was published, Unix seconds")
    decision: Literal["promoted", "rejected"] | None = Field(description="the gate's decision")
    accuracy: float | None = Field(description="this version's accuracy at its gate (held-out or `scope` events)")
    serving_accuracy: float | None = Field(description="the serving version's accuracy on the same events")
    holdout_events: int | None = Field(None, description="how many events the gate judged on")
    scope: str | None = Field(None, description="which events: window, newest (held out) or prequential")
    lineage: int | None = None
    step: int | None = None


class ServingChange(BaseModel):
    t: float | None = Field(description="when the serving pointer moved to this version, Unix seconds")
    version: int
    kind: Literal["gate", "rollback", "manual"] = Field(description="gate promotion, rollback, or operator pin")
    reason: str


class ServingState(BaseModel):
    version: int | None = Field(description="the registry's serving version")
    loaded: int | None = Field(description="the version this server answers with")
    pinned: bool


class StatusResponse(BaseModel):
    """What the console shows; ``points`` holds only those newer than the ``since`` asked for.

    ``task``'s own: ``serving``, ``versions``, ``serving_changes``, ``labels``, ``task_stat``. The
    trainer's whole: ``points`` (their accuracy, majority and drift count are the default task's)
    and ``snapshot`` (its drift marks are the default task's, its task table every task's)."""

    role: Literal["colocated", "replica"] = Field(description="replica: no trainer beside this server")
    now: float = Field(description="the server's clock, Unix seconds")
    task: str = Field(description="the task asked for (default: default)")
    tasks: list[str] = Field(description="the tasks this server serves, default first")
    points: list[Point]
    snapshot: Snapshot | None = Field(
        description="the trainer's latest snapshot, without the per-task labels (see `labels`); null on a replica"
    )
    labels: list[LabelStat] = Field(description="the task's labels over its prequential window; empty on a replica")
    task_stat: TaskStat | None = Field(description="the task's figures from the trainer; null on a replica")
    serving: ServingState
    versions: list[VersionMark]
    serving_changes: list[ServingChange] = Field(description="the task's serving pointer's history, oldest first")
    requests: dict[str, int] = Field(description="requests this server answered, by HTTP status")


def _unix(iso: Any) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp() if isinstance(iso, str) else None
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _kind(reason: str) -> Literal["gate", "rollback", "manual"]:
    if reason.startswith("gate:"):  # the publisher's promotions (dynft.publisher)
        return "gate"
    return "rollback" if "rolled back" in reason else "manual"


def versions_timeline(registry: AdapterRegistry) -> tuple[list[VersionMark], list[ServingChange], ServingState]:
    """The registry's versions with their gate decisions, and the serving pointer's moves."""
    marks = []
    for version in registry.versions():
        try:
            meta = registry.meta(version)
        except RegistryError:  # pruned or half-written meanwhile: not shown
            continue
        gate: dict[str, Any] = meta["gate"] if isinstance(meta.get("gate"), dict) else {}
        decision = gate.get("decision")
        marks.append(
            VersionMark(
                version=version,
                t=_unix(meta.get("created_at")),
                decision=decision if decision in ("promoted", "rejected") else None,
                accuracy=_number(gate.get("candidate_accuracy")),
                serving_accuracy=_number(gate.get("serving_accuracy")),
                holdout_events=gate.get("holdout_events") if isinstance(gate.get("holdout_events"), int) else None,
                scope=gate.get("scope") if isinstance(gate.get("scope"), str) else None,
                lineage=meta.get("lineage") if isinstance(meta.get("lineage"), int) else None,
                step=meta.get("step") if isinstance(meta.get("step"), int) else None,
            )
        )
    try:
        pointer = registry.serving()
    except RegistryError:
        return marks, [], ServingState(version=None, loaded=None, pinned=False)
    changes = [
        ServingChange(
            t=_unix(h.get("updated_at")),
            version=h["version"],
            kind=_kind(str(h.get("reason", ""))),
            reason=str(h.get("reason", "")),
        )
        for h in reversed(pointer.history)
        if isinstance(h.get("version"), int)
    ]
    if pointer.version is not None:
        changes.append(
            ServingChange(
                t=_unix(pointer.updated_at),
                version=pointer.version,
                kind=_kind(pointer.reason),
                reason=pointer.reason,
            )
        )
    return marks, changes, ServingState(version=pointer.version, loaded=None, pinned=pointer.pinned)


PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def plain_number(value: object) -> object:
    """A query's number in the schema's form: ``float()`` also takes surrounding whitespace of any
    kind (a fuzzer's ``%C2%852``, NEL then 2) and underscores, which a JSON number does not."""
    if isinstance(value, str) and not PLAIN_NUMBER.fullmatch(value):
        raise ValueError("not a decimal number")
    return value


def console_router(settings: Settings, engine: InferenceEngine, metrics: ServerMetrics) -> APIRouter:
    """The page, its static files and ``/v1/status``; each task's registry, the default's
    included, is read from its lane in ``engine``."""
    router = APIRouter()
    directory = settings.state_dir / CONSOLE_DIR
    history = HistoryReader(directory / HISTORY_FILE)
    show_texts = settings.console_show_texts
    files = resources.files("dynft.serving").joinpath("static")

    # A page, not an API; HEAD too, as uptime checkers probe pages.
    @router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    @router.api_route("/console", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(files.joinpath("console.html").read_text(encoding="utf-8"))

    @router.get("/console/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: no path from the request ever reaches the file system
            raise HTTPException(404, f"no static file {name!r}")
        return Response(files.joinpath(name).read_bytes(), media_type=STATIC[name])

    def lane_of(task: str) -> Lane:
        """The task's lane; a task given twice is refused before this (``dynft.serving.checks``)."""
        if is_blank(task):
            raise ApiError(422, "invalid_request", "task: blank; name a task (default: default)")
        lane = engine.lanes.get(task)
        if lane is None:  # the same error as /v1/predict's
            raise unknown_task(engine, task)
        return lane

    @router.get(
        "/v1/status",
        response_model=StatusResponse,
        summary="What the console shows",
        responses=error_responses(404, 422),
    )
    def status(
        since: Annotated[
            float | None,
            Query(allow_inf_nan=False, description="only points newer than this Unix time"),
            BeforeValidator(plain_number),
        ] = None,
        task: Annotated[
            str,
            Query(
                min_length=1,
                json_schema_extra={"pattern": NOT_BLANK},  # checked below, for a message without the pattern
                description="the task whose labels, versions and serving pointer are shown; an unknown one is a 404",
            ),
        ] = DEFAULT_TASK,
    ) -> StatusResponse:
        lane = lane_of(task)
        snapshot_path = directory / SNAPSHOT_FILE
        colocated = history.exists or snapshot_path.exists()
        snapshot = read_snapshot(snapshot_path) if colocated else None
        labels: list[LabelStat] = []
        task_stat = None
        if snapshot is not None:
            labels = snapshot.labels if task == DEFAULT_TASK else snapshot.task_labels.get(task, [])
            task_stat = next((t for t in snapshot.task_stats if t.task == task), None)
            snapshot.task_labels, snapshot.task_first_seen, snapshot.task_started = {}, {}, {}  # only `labels` is sent
            if not show_texts:  # whatever the trainer wrote, this server's setting rules
                snapshot.dead_letters = [d.model_copy(update={"text": None}) for d in snapshot.dead_letters]
        marks, changes, serving = versions_timeline(lane.registry)
        active = lane.active
        serving.loaded = active.version if active is not None else None
        requests = {
            s.labels["status"]: int(s.value)
            for m in metrics.requests.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        return StatusResponse(
            role="colocated" if colocated else "replica",
            now=time.time(),
            task=task,
            tasks=sorted(engine.lanes, key=lambda name: (name != DEFAULT_TASK, name)),
            points=history.points(since) if colocated else [],
            snapshot=snapshot,
            labels=labels,
            task_stat=task_stat,
            serving=serving,
            versions=marks,
            serving_changes=changes,
            requests=requests,
        )

    return router
