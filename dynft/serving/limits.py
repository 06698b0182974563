"""Request limits as ASGI middleware, and the API's error type they answer with.

``InternalErrors`` answers an unforeseen exception with a 500 and keeps the connection.
``BodyLimit`` refuses bodies over ``server.max_body_bytes`` (413); ``BodyDeadline`` answers 408
and closes the connection when a body is not complete ``server.body_timeout_s`` after its
headers; ``HeadDeadline`` (uvicorn's HTTP protocol, not middleware: no request exists yet) closes
a connection that has not sent a whole request head ``server.header_timeout_s`` after it opened
or after its last response. Together with uvicorn's ``limit_concurrency`` they keep slow or
greedy clients from exhausting memory, tasks or file descriptors.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import h11
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code; FastAPI lets it through body parsing untouched."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message, headers)
        self.code, self.message = code, message


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class InternalErrors:
    """An exception no handler took becomes a 500 ``internal`` here, logged with its traceback, and
    goes no further: Starlette's catch-all answers and then raises it again, and uvicorn drops the
    connection, so a keep-alive client's next request on it was reset."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:  # half a response is out: nothing whole can follow it
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            await error_response(500, "internal", f"internal error: {type(exc).__name__}")(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, by header or while streaming, and
    bodies framed both by length and by chunks with 400."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and b"transfer-encoding" in headers:
            # Framed two ways: a proxy in front that reads the other one would see other requests
            # on this connection than the server does (request smuggling). RFC 9112 6.3: an error.
            await error_response(
                400, "invalid_request", "Content-Length and Transfer-Encoding together", {"Connection": "close"}
            )(scope, receive, send)
            return
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


class BodyDeadline:
    """Answers 408 and closes the connection when a request body is not complete ``timeout_s`` after its headers.

    uvicorn has no deadline of its own for a body: a client that sends headers and then
    trickles or stalls its body would hold a connection, a task and a file descriptor forever.
    """

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        complete = False

        async def timed() -> Message:
            nonlocal complete
            if complete:  # after the body, receive() waits for a disconnect: not a body read
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ApiError(
                    408,
                    "body_timeout",
                    f"the request body did not arrive within {self.timeout_s} s",
                    {"Connection": "close"},  # the rest of the body may still come: this connection is done
                ) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head, and ``limit_concurrency``
    counted in connections.

    uvicorn arms its keep-alive timer only after a response and disarms it at the first byte, so
    a connection that sends nothing, or a head a byte at a time, is held open for ever, and
    ``limit_concurrency`` such connections lock every client out (503). So is one whose request
    was answered before its body was read (a 413 by its declared length, a 401, a GET with a
    body) and that then sends a byte of that body now and then: uvicorn discards such bytes, and
    only a new request's head ends the wait. Owned by the event loop.
    """

    head_timeout_s = 10.0  # set per server: make_head_deadline

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._handling():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._handling():  # kept alive: the next head (or the rest of an unread body) has a deadline
            self._arm()

    def _handling(self) -> bool:
        """A request's head is in and its response is not complete (its body is the app's to time)."""
        return self.conn.our_state is h11.SEND_RESPONSE

    @property  # type: ignore[override]
    def limit_concurrency(self) -> int | None:
        """What uvicorn compares both its open connections and its request tasks with, at each
        request head: the setting where connections reach it (or tasks twice it), else no limit.

        A keep-alive connection's next request can arrive while the task of its previous one is
        still unwinding, so uvicorn's task count ran ahead of the connections: 150 clients of a
        limit of 256 got 503s. Each connection has at most two tasks at a time.
        """
        limit = self._limit
        if limit is None or len(self.connections) >= limit or len(self.tasks) >= 2 * limit:
            return limit
        return None

    @limit_concurrency.setter
    def limit_concurrency(self, value: int | None) -> None:  # uvicorn's __init__ sets it from its config
        self._limit = value

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _expired(self) -> None:
        self._head_deadline = None
        if not self._handling() and not self.transport.is_closing():
            self.transport.close()


def make_head_deadline(timeout_s: float) -> type[HeadDeadline]:
    """``HeadDeadline`` with ``timeout_s``, as the class uvicorn instantiates per connection."""
    return type("HeadDeadline", (HeadDeadline,), {"head_timeout_s": timeout_s})
