"""The HTTP API (FastAPI): predictions, adapter administration, health and metrics.

Every error is a JSON body ``{"error": {"code": ..., "message": ...}}`` with a 4xx or 503/504
status; admin endpoints need ``Authorization: Bearer <server.admin_token>`` (401 without a
token, 403 with a wrong one).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynft.errors import RegistryError
from dynft.metrics import ServerMetrics, exposition
from dynft.registry import AdapterRegistry
from dynft.serving.engine import InferenceEngine, NotReady, Overloaded
from dynft.settings import Settings


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code; FastAPI lets it through body parsing untouched."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.code, self.message = code, message


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(min_length=1, description="texts to classify")
    top_k: int | None = Field(None, ge=1, description="return only the k most probable labels per text")


class ScoredLabel(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    predictions: list[ScoredLabel]
    adapter_version: int


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await error_response(413, "body_too_large", f"request bodies are limited to {self.limit} bytes")(
                scope, receive, send
            )
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, "body_too_large", f"request bodies are limited to {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(
    settings: Settings,
    engine: InferenceEngine,
    registry: AdapterRegistry,
    metrics: ServerMetrics,
    metrics_registry: Any,
    admin_token: str,
) -> FastAPI:
    app = FastAPI(title="dynft", version="1", summary="Continually fine-tuned text classification")
    s = settings.server
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)  # added first: runs inside the request counter

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        try:
            response: Response = await call_next(request)
        except Exception:
            metrics.requests.labels("500").inc()
            raise
        metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "internal", f"internal error: {type(exc).__name__}")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(parts[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, "http_error", str(exc.detail), getattr(exc, "headers", None))

    def admin(request: Request) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "unauthorized",
                "admin endpoints need 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.encode(), admin_token.encode()):
            raise ApiError(403, "forbidden", "the bearer token is not the admin token")

    admin_only = [Depends(admin)]

    @app.post("/v1/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest) -> dict[str, Any]:
        started = time.perf_counter()
        if len(body.texts) > s.max_texts:
            raise ApiError(422, "too_many_texts", f"at most {s.max_texts} texts per request, got {len(body.texts)}")
        for i, text in enumerate(body.texts):
            if not text.strip():
                raise ApiError(422, "empty_text", f"texts[{i}] is empty")
            if len(text) > settings.events.max_text_chars:
                raise ApiError(
                    422,
                    "text_too_long",
                    f"texts[{i}] has {len(text)} chars, the limit is {settings.events.max_text_chars}",
                )
        try:
            future = engine.submit(list(body.texts))
            answer = await asyncio.wait_for(asyncio.wrap_future(future), timeout=s.request_timeout_s)
        except NotReady as exc:
            raise ApiError(503, "not_ready", str(exc), {"Retry-After": "1"}) from exc
        except Overloaded as exc:
            raise ApiError(503, "overloaded", str(exc), {"Retry-After": "1"}) from exc
        except TimeoutError as exc:
            raise ApiError(504, "timeout", f"no answer within {s.request_timeout_s} s") from exc
        predictions = []
        for p in answer.predictions:
            scores = p.scores
            if body.top_k is not None:
                scores = dict(sorted(scores.items(), key=lambda kv: -kv[1])[: body.top_k])
            predictions.append({"label": p.label, "scores": scores})
        metrics.predict_seconds.observe(time.perf_counter() - started)
        return {"predictions": predictions, "adapter_version": answer.version}

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        pointer = registry.serving()
        versions = []
        for version in registry.versions():
            try:
                meta = registry.meta(version)
            except RegistryError:
                continue
            versions.append(
                {
                    k: meta.get(k)
                    for k in (
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
                    )
                }
            )
        active = engine.active
        return {
            "serving": pointer.version,
            "pinned": pointer.pinned,
            "reason": pointer.reason,
            "loaded": active.version if active else None,
            "versions": versions,
        }

    @app.post("/v1/adapters/{version}/promote", dependencies=admin_only)
    async def promote(version: int) -> dict[str, Any]:
        try:
            await asyncio.to_thread(registry.promote, version, "promoted through the admin API", True)
        except RegistryError as exc:
            raise ApiError(404 if "does not exist" in str(exc) else 409, "bad_version", str(exc)) from exc
        return {"serving": version, "pinned": True}

    @app.post("/v1/adapters/rollback", dependencies=admin_only)
    async def rollback() -> dict[str, Any]:
        try:
            version = await asyncio.to_thread(registry.rollback, "rolled back through the admin API")
        except RegistryError as exc:
            raise ApiError(409, "no_rollback", str(exc)) from exc
        return {"serving": version, "pinned": True}

    @app.post("/v1/adapters/unpin", dependencies=admin_only)
    async def unpin() -> dict[str, Any]:
        await asyncio.to_thread(registry.unpin)
        return {"serving": registry.serving().version, "pinned": False}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        active = engine.active
        if not engine.ready or active is None:
            return error_response(503, "not_ready", "no adapter version is loaded yet")
        return JSONResponse({"status": "ready", "adapter_version": active.version})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        body, content_type = exposition(metrics_registry)
        return Response(body, media_type=content_type)

    return app
