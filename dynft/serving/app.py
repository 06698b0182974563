"""The HTTP API (FastAPI): predictions, adapter administration, health and metrics.

Every error is a JSON body ``{"error": {"code": ..., "message": ...}}`` with a 4xx or 503/504
status; admin endpoints need ``Authorization: Bearer <server.admin_token>`` (401 without a
token, 403 with a wrong one). The OpenAPI schema at ``/openapi.json`` declares all of it (error
bodies, the bearer scheme, the request limits), so a schema-driven fuzzer can hold the server
to it (``tests/serving/test_fuzz.py``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dynft.errors import PointerUnreadableError, RegistryError, RegistryWriteError, VersionNotFoundError
from dynft.metrics import ServerMetrics, exposition
from dynft.registry import AdapterRegistry
from dynft.serving.answers import ClientGone, NotReady, Overloaded, UnknownTask
from dynft.serving.checks import check_texts, repeated_key, unknown_task
from dynft.serving.console import console_router
from dynft.serving.counting import CountRequests
from dynft.serving.engine import InferenceEngine
from dynft.serving.limits import (
    CLIENT_GONE,
    ApiError,
    BodyDeadline,
    BodyLimit,
    CloseWhenStopping,
    InternalErrors,
    answer_or_gone,
    error_response,
)
from dynft.serving.schemas import (
    NOT_BLANK,
    PredictRequest,
    PredictResponse,
    Ready,
    TasksResponse,
    error_responses,
)
from dynft.settings import Settings
from dynft.tasks import DEFAULT_TASK

log = logging.getLogger(__name__)


def _parse_failure(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not parse a body it reports as a bare 400, or None for any other error.

    Told by the error's cause, not its text: FastAPI raises that 400 ``from`` the exception that
    parsing met (an HTTPException of its own passes through unchained).
    """
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None or isinstance(cause, StarletteHTTPException):
        return None
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the body's JSON is nested too deeply"
    if isinstance(cause, ValueError):  # malformed JSON is reported apart: a number json cannot convert
        digits = sys.get_int_max_str_digits()
        return f"the body holds a number that cannot be read (integers have at most {digits} digits)"
    return f"the body could not be parsed ({type(cause).__name__})"


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ApiError):  # pragma: no cover - registered for ApiError only
        raise exc
    return error_response(exc.status_code, exc.code, exc.message, exc.headers)


async def _internal(_: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal", f"internal error: {type(exc).__name__}")


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):  # pragma: no cover - registered for it only
        raise exc
    parts = []
    for e in exc.errors():
        if e["type"] == "json_invalid":  # loc is ("body", character offset)
            parts.append(f"malformed JSON at character {e['loc'][-1]}: {e.get('ctx', {}).get('error', e['msg'])}")
        else:
            parts.append(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}")
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type and any(e["loc"][:1] == ("body",) for e in exc.errors()):
        # FastAPI does not parse a body sent without a JSON content type: say so, not just "invalid".
        parts.insert(0, f"send the body as JSON with 'Content-Type: application/json' (got {content_type!r})")
    return error_response(422, "invalid_request", "; ".join(parts[:5]))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):  # pragma: no cover - registered for it only
        raise exc
    if isinstance(exc.__cause__, ClientDisconnect):  # the body stopped with the connection: no bad request
        return error_response(CLIENT_GONE, "client_closed", "the client closed the connection during its body")
    unparsable = _parse_failure(exc)
    if unparsable is not None:  # malformed bodies are 422 whichever way they are malformed
        return error_response(422, "invalid_request", unparsable)
    code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {"code", "message"}}``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(Exception, _internal)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)


def predict_router(settings: Settings, engine: InferenceEngine, metrics: ServerMetrics) -> APIRouter:
    """``POST /v1/predict`` and ``GET /v1/tasks``."""
    router = APIRouter()
    s = settings.server

    @router.post("/v1/predict", response_model=PredictResponse, responses=error_responses(404, 413, 422, 500, 503, 504))
    async def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        if "task" in request.query_params:  # as the admin routes take it: said, not ignored (others are)
            raise ApiError(422, "invalid_request", "/v1/predict takes its task in the body, not the query")
        key = repeated_key(await request.body())  # the body FastAPI read, kept by the request
        if key is not None:
            raise ApiError(
                422, "invalid_request", f"field {key[:64]!r} is given twice; which value is meant is unknown"
            )
        check_texts(settings, body.texts)
        task = body.task if body.task is not None else DEFAULT_TASK
        try:
            future = engine.submit(list(body.texts), task)
            answer = await answer_or_gone(future, request.receive, s.request_timeout_s)
        except UnknownTask as exc:
            raise unknown_task(engine, task) from exc
        except NotReady as exc:
            raise ApiError(503, "not_ready", str(exc), {"Retry-After": "1"}) from exc
        except Overloaded as exc:
            raise ApiError(503, "overloaded", str(exc), {"Retry-After": "1"}) from exc
        except TimeoutError as exc:
            raise ApiError(504, "timeout", f"no answer within {s.request_timeout_s} s") from exc
        except ClientGone as exc:  # nobody reads it; counted apart from the server's own failures
            raise ApiError(CLIENT_GONE, "client_closed", str(exc)) from exc
        except Exception as exc:  # the worker's failure (logged there): a 500 that keeps the connection
            raise ApiError(500, "internal", f"internal error: {type(exc).__name__}") from exc
        predictions = []
        for p in answer.predictions:
            scores = p.scores
            if body.top_k is not None:
                scores = dict(sorted(scores.items(), key=lambda kv: -kv[1])[: body.top_k])
            predictions.append({"label": p.label, "scores": scores})
        metrics.predict_seconds.observe(time.perf_counter() - started)
        metrics.task_predict_seconds.labels(task).observe(time.perf_counter() - started)  # a known task: bounded
        return {
            "predictions": predictions,
            "adapter_version": answer.version,
            "task": task,
            "fast_path": answer.fast_path,
        }

    @router.get("/v1/tasks", response_model=TasksResponse, responses=error_responses(503))
    async def tasks() -> dict[str, Any]:
        out = []
        for name, lane in sorted(engine.lanes.items()):
            active = lane.active
            try:
                serving = lane.registry.serving().version
            except RegistryError:
                serving = None
            out.append(
                {
                    "task": name,
                    "labels": list(active.labels) if active else [],
                    "serving": serving,
                    "loaded": active.version if active else None,
                }
            )
        return {"tasks": out}

    return router


VERSION_FIELDS = (
    "version",
    "parent",
    "lineage",
    "step",
    "labels",
    "created_at",
    "events_seen",
    "metrics",
    "gate",
    "content_hash",
    "lexical_weight",  # the adapter's share of the served blend with its word counts (dynft.lexical)
)


def admin_router(engine: InferenceEngine, admin_token: str) -> APIRouter:
    """The adapter versions of each task (``?task=``, default ``default``): list, promote, rollback, unpin."""
    router = APIRouter()
    # auto_error=False: the scheme is declared in the OpenAPI schema, the errors are dynft's own.
    bearer = HTTPBearer(auto_error=False, description="server.admin_token")

    def admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if credentials is None:  # no header, another scheme, or an empty token
            raise ApiError(
                401,
                "unauthorized",
                "admin endpoints need 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(credentials.credentials.encode(), admin_token.encode()):
            raise ApiError(403, "forbidden", "the bearer token is not the admin token")

    admin_only = [Depends(admin)]
    task_query = Query(None, min_length=1, description="the task (default: default); an unknown one is a 404")
    # Digits only: as an int, "1_0" was version 10 and "5.0", "+5" or " 5" version 5.
    version_path = Path(pattern=r"^[0-9]{1,30}$", description="the version number")

    def registry_of(task: str | None) -> AdapterRegistry:
        lane = engine.lanes.get(task if task is not None else DEFAULT_TASK)
        if lane is None:
            raise unknown_task(engine, task if task is not None else DEFAULT_TASK)
        return lane.registry

    def registry_failed(exc: RegistryWriteError | PointerUnreadableError) -> ApiError:
        # The disk, not the request, is at fault: a 503 the client may retry; serving is unaffected.
        # The body stays short: paths and OS errors describe the host, so they go to the log only.
        log.error("admin request failed: %s", exc)
        code, which = (
            ("registry_unwritable", "written")
            if isinstance(exc, RegistryWriteError)
            else ("registry_unreadable", "read")
        )
        return ApiError(503, code, f"the registry cannot be {which} now; see the server log", {"Retry-After": "10"})

    @router.get("/v1/adapters", responses=error_responses(404, 422, 503))
    async def adapters(task: str | None = task_query) -> dict[str, Any]:
        registry = registry_of(task)
        try:
            pointer = registry.serving()
        except PointerUnreadableError as exc:
            raise registry_failed(exc) from exc
        lane = engine.lanes[task or DEFAULT_TASK]
        versions = []
        for version in registry.versions():
            try:
                meta = registry.meta(version)
            except RegistryError:
                continue
            # "unreadable" / "mismatch" once it failed to load: the metric's label, not the message
            versions.append({k: meta.get(k) for k in VERSION_FIELDS} | {"refused": lane.refused.get(version)})
        active = lane.active
        return {
            "serving": pointer.version,
            "pinned": pointer.pinned,
            "reason": pointer.reason,
            "loaded": active.version if active else None,
            "versions": versions,
        }

    @router.post(
        "/v1/adapters/{version}/promote",
        dependencies=admin_only,
        responses=error_responses(401, 403, 404, 409, 422, 503),
    )
    async def promote(version: str = version_path, task: str | None = task_query) -> dict[str, Any]:
        registry = registry_of(task)
        try:
            await asyncio.to_thread(
                registry.promote, int(version), "promoted through the admin API", True, engine.base_model
            )
        except (RegistryWriteError, PointerUnreadableError) as exc:
            raise registry_failed(exc) from exc
        except VersionNotFoundError as exc:
            raise ApiError(404, "bad_version", str(exc)) from exc
        except RegistryError as exc:
            raise ApiError(409, "bad_version", str(exc)) from exc
        return {"serving": int(version), "pinned": True}

    @router.post(
        "/v1/adapters/rollback", dependencies=admin_only, responses=error_responses(401, 403, 404, 409, 422, 503)
    )
    async def rollback(task: str | None = task_query) -> dict[str, Any]:
        registry = registry_of(task)
        try:
            version = await asyncio.to_thread(registry.rollback, "rolled back through the admin API")
        except (RegistryWriteError, PointerUnreadableError) as exc:
            raise registry_failed(exc) from exc
        except RegistryError as exc:
            raise ApiError(409, "no_rollback", str(exc)) from exc
        return {"serving": version, "pinned": True}

    @router.post("/v1/adapters/unpin", dependencies=admin_only, responses=error_responses(401, 403, 404, 422, 503))
    async def unpin(task: str | None = task_query) -> dict[str, Any]:
        registry = registry_of(task)
        try:
            await asyncio.to_thread(registry.unpin)
            serving = registry.serving().version
        except (RegistryWriteError, PointerUnreadableError) as exc:
            raise registry_failed(exc) from exc
        return {"serving": serving, "pinned": False}

    return router


def create_app(
    settings: Settings,
    engine: InferenceEngine,
    registry: AdapterRegistry,
    metrics: ServerMetrics,
    metrics_registry: Any,
    admin_token: str,
    stopping: Callable[[], bool] = lambda: False,
) -> FastAPI:
    """The API; ``stopping()`` says when the server shuts down (responses then close their connections)."""
    # No redirect of /v1/predict/ to /v1/predict: a 307 built from the client's Host header, with
    # no JSON body, where every other unknown path gets a JSON 404.
    app = FastAPI(
        title="dynft", version="1", summary="Continually fine-tuned text classification", redirect_slashes=False
    )
    s = settings.server
    app.add_middleware(InternalErrors)  # the innermost: the request counter sees its 500
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)  # runs inside the request counter
    app.add_middleware(BodyDeadline, timeout_s=s.body_timeout_s)
    app.add_middleware(CloseWhenStopping, stopping=stopping)
    app.add_middleware(CountRequests, metrics=metrics)  # the outermost: it counts what the others answer
    app.include_router(console_router(settings, engine, metrics))  # the page at / and /v1/status

    install_error_handlers(app)
    app.include_router(predict_router(settings, engine, metrics))
    app.include_router(admin_router(engine, admin_token))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses=error_responses(503))
    async def readyz() -> JSONResponse:
        # Ready once any task serves a version: a daemon of named tasks alone has no default one.
        serving = engine.serving
        if not serving:
            return error_response(503, "not_ready", "no adapter version is loaded yet")
        if not engine.ready:
            return error_response(503, "not_ready", "the inference worker keeps failing; the server's log says why")
        default = serving.get(DEFAULT_TASK)
        return JSONResponse({"status": "ready", "adapter_version": default, "tasks": serving})

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
    )
    async def metrics_endpoint() -> Response:
        body, content_type = exposition(metrics_registry)
        return Response(body, media_type=content_type)

    # Some load balancers and uptime checkers probe with HEAD: the same status, no body (uvicorn
    # drops it). Out of the schema, where a second operation per path would repeat GET's.
    for path, probe in (("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics_endpoint)):
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, plus the per-text limits that the endpoint (not pydantic) enforces."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # builds and caches it in app.openapi_schema
        texts = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
        texts["maxItems"] = s.max_texts
        texts["items"].update(minLength=1, maxLength=settings.events.max_text_chars, pattern=NOT_BLANK)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app
