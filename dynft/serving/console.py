"""The live console: a read-only page at ``/`` and the JSON it polls, ``GET /v1/status``.

The page (``dynft/serving/static/``: HTML, CSS and a small script, no build step, nothing
fetched from elsewhere) asks for ``/v1/status?since=T`` every two seconds and gets only the
points newer than ``T``. The points and the snapshot come from the trainer's console files
(``dynft.history``); the versions timeline comes from the registry. A server with no trainer
files in its state directory is a *replica*: it shows what it serves and answers, no curves.

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
from dynft.history import CONSOLE_DIR, HISTORY_FILE, SNAPSHOT_FILE, HistoryReader, Point, Snapshot, read_snapshot
from dynft.metrics import ServerMetrics
from dynft.registry import AdapterRegistry
from dynft.serving.engine import InferenceEngine
from dynft.settings import Settings

STATIC = {"console.js": "text/javascript", "console.css": "text/css"}  # the files the page loads


class VersionMark(BaseModel):
    version: int
    t: float | None = Field(description="when it was published, Unix seconds")
    decision: Literal["promoted", "rejected"] | None = Field(description="the gate's decision")
    accuracy: float | None = Field(description="held-out accuracy at the gate")
    serving_accuracy: float | None = Field(description="the serving version's accuracy on the same window")
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
    """What the console shows; ``points`` holds only those newer than the ``since`` asked for."""

    role: Literal["colocated", "replica"] = Field(description="replica: no trainer beside this server")
    now: float = Field(description="the server's clock, Unix seconds")
    points: list[Point]
    snapshot: Snapshot | None = Field(description="the trainer's latest snapshot; null on a replica")
    serving: ServingState
    versions: list[VersionMark]
    serving_changes: list[ServingChange] = Field(description="the serving pointer's history, oldest first")
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


def console_router(
    settings: Settings, engine: InferenceEngine, registry: AdapterRegistry, metrics: ServerMetrics
) -> APIRouter:
    """The page, its static files and ``/v1/status``."""
    router = APIRouter()
    directory = settings.state_dir / CONSOLE_DIR
    history = HistoryReader(directory / HISTORY_FILE)
    show_texts = settings.console_show_texts
    files = resources.files("dynft.serving").joinpath("static")

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    @router.get("/console", response_class=HTMLResponse, include_in_schema=False)  # a page, not an API
    def page() -> HTMLResponse:
        return HTMLResponse(files.joinpath("console.html").read_text(encoding="utf-8"))

    @router.get("/console/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:  # a fixed list: no path from the request ever reaches the file system
            raise HTTPException(404, f"no static file {name!r}")
        return Response(files.joinpath(name).read_bytes(), media_type=STATIC[name])

    @router.get("/v1/status", response_model=StatusResponse, summary="What the console shows")
    def status(
        since: Annotated[
            float | None,
            Query(allow_inf_nan=False, description="only points newer than this Unix time"),
            BeforeValidator(plain_number),
        ] = None,
    ) -> StatusResponse:
        snapshot_path = directory / SNAPSHOT_FILE
        colocated = history.exists or snapshot_path.exists()
        snapshot = read_snapshot(snapshot_path) if colocated else None
        if snapshot is not None and not show_texts:  # whatever the trainer wrote, this server's setting rules
            snapshot.dead_letters = [d.model_copy(update={"text": None}) for d in snapshot.dead_letters]
        marks, changes, serving = versions_timeline(registry)
        active = engine.active
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
            points=history.points(since) if colocated else [],
            snapshot=snapshot,
            serving=serving,
            versions=marks,
            serving_changes=changes,
            requests=requests,
        )

    return router
