"""Request limits as ASGI middleware, and the API's error type they answer with.

``InternalErrors`` answers an unforeseen exception with a 500 and keeps the connection.
``BodyLimit`` refuses bodies over ``server.max_body_bytes`` (413); ``BodyDeadline`` answers 408
and closes the connection when a body is not complete ``server.body_timeout_s`` after its
headers; ``HeadDeadline`` (uvicorn's HTTP protocol, not middleware: no request exists yet) closes
a connection that has not sent a whole request head ``server.header_timeout_s`` after it opened
or after its last response; ``Admission`` serves at most ``server.limit_concurrency`` connections
at once and refuses new ones beyond them. Together they keep slow or greedy clients from
exhausting memory, tasks or file descriptors. ``answer_or_gone`` withdraws a request whose client
left; ``CloseWhenStopping`` tells kept-alive clients, at a shutdown, that their connection ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Literal, TypeVar

import h11
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from dynft.metrics import ServerMetrics
from dynft.serving.answers import ClientGone

log = logging.getLogger(__name__)

Verdict = Literal["serve", "refuse", "close"]
T = TypeVar("T")
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # answered even on a refused connection
# nginx's "client closed request": the status counted (dynft_requests_total) for a request whose
# client left before its answer; the client never sees it.
CLIENT_GONE = 499


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


class CloseWhenStopping:
    """``Connection: close`` on every response once the server is stopping (``stopping()``): uvicorn
    closes a kept-alive connection after its in-flight response at a shutdown without saying so,
    and the client's next request on it was reset (a POST, which clients do not retry)."""

    def __init__(self, app: ASGIApp, stopping: Callable[[], bool]) -> None:
        self.app, self.stopping = app, stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start" and self.stopping():
                await _closing(send)(message)
            else:
                await send(message)

        await self.app(scope, receive, sending)


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


async def answer_or_gone(future: Future[T], receive: Receive, timeout_s: float) -> T:
    """The result of ``future`` (the engine's answer), waited for at most ``timeout_s``; the future is
    cancelled (the engine's worker skips it) when the time is up (``TimeoutError``) or the client
    closes its connection first (``ClientGone``). Without that, requests abandoned by clients that
    gave up kept the queue full and were computed for nobody while live clients waited behind them.

    ``receive`` is the request's, its body read: uvicorn answers it only once the client is gone.
    """
    waiting = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait((waiting, gone), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():  # timed out, the client gone, or this task cancelled (a shutdown)
            future.cancel()  # queued, not begun: withdrawn; begun: its answer is dropped
            waiting.cancel()
    if waiting in done:
        return waiting.result()
    if gone in done:
        gone.exception()  # retrieved: a receive that failed ends the wait as a disconnect does
        raise ClientGone("the client closed the connection before its answer")
    raise TimeoutError


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


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


class Admission:
    """Which connections a server serves: at most ``limit`` at once, first come first served.

    A connection beyond them is refused, not the ones already in: it gets a 503 ``overloaded``
    (with ``Connection: close``) to its first request head (a probe or scrape of ``PROBES`` is
    answered instead, and closed), or, while ``limit`` refused ones already wait for theirs, is
    closed at once. So a server holds at most twice ``limit``
    sockets, and idle connections (closed at ``server.header_timeout_s``) cost the clients that
    come next, never those being served. Refusals are counted and logged at most once per
    ``log_interval_s``, each when it is refused: ``dynft_connections_refused_total{how="503"}``
    (also in ``dynft_requests_total{status="503"}`` once answered) or ``{how="closed"}``. Owned
    by the event loop.
    """

    log_interval_s = 10.0

    def __init__(self, limit: int, metrics: ServerMetrics | None = None) -> None:
        self.limit, self.metrics = limit, metrics
        self.served = self.waiting = 0  # connections admitted; refused ones waiting for a head
        self._unlogged = {"503": 0, "closed": 0}
        self._last_log = -float("inf")
        self._log_timer: asyncio.TimerHandle | None = None

    def enter(self) -> Verdict:
        """The verdict on a new connection; ``leave`` with it when the connection is lost."""
        if self.served < self.limit:
            self.served += 1
            return "serve"
        if self.waiting < self.limit:
            self.waiting += 1
            self._refused("503")
            return "refuse"
        self._refused("closed")
        return "close"

    def leave(self, verdict: Verdict) -> None:
        if verdict == "serve":
            self.served -= 1
        elif verdict == "refuse":
            self.waiting -= 1

    def refusing(self, app: ASGIApp) -> ASGIApp:
        """The ASGI app of a refused connection: its first request gets a 503 ``overloaded``, which
        closes it; a health probe or a scrape (``PROBES``) is answered by ``app`` and closes it. An
        orchestrator whose liveness probe failed while clients held every connection restarted a
        server that worked, and Prometheus lost its scrapes when they were needed most."""

        async def refused(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] in PROBES and scope["method"] in ("GET", "HEAD"):
                await app(scope, receive, _closing(send))
            else:
                await self.refusal(scope, receive, send)

        return refused

    async def refusal(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A refused connection's first request gets this 503, which closes it."""
        if self.metrics is not None:
            self.metrics.requests.labels("503").inc()
        message = f"the server serves {self.limit} connections at once; try again on a new one"
        headers = {"Connection": "close", "Retry-After": "1"}
        await error_response(503, "overloaded", message, headers)(scope, receive, send)

    def _refused(self, how: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(how).inc()
        self._unlogged[how] += 1
        if self._log_timer is None:  # the first refusal after a quiet interval is logged at once
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_log + self.log_interval_s - loop.time())
            self._log_timer = loop.call_later(delay, self._log)

    def _log(self) -> None:
        self._log_timer = None
        self._last_log = asyncio.get_running_loop().time()
        answered, closed = self._unlogged["503"], self._unlogged["closed"]
        self._unlogged = {"503": 0, "closed": 0}
        log.warning(
            "server.limit_concurrency=%d connections are being served: refused %d new ones "
            "(%d answered 503 overloaded at their first request, %d closed at once)",
            self.limit,
            answered + closed,
            answered,
            closed,
        )


def _closing(send: Send) -> Send:
    """``send`` with ``Connection: close`` on the response: uvicorn closes the connection after it."""

    async def closing(message: Message) -> None:
        headers = message.get("headers", [])
        if message["type"] == "http.response.start" and not any(k.lower() == b"connection" for k, _ in headers):
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return closing


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head, and ``Admission`` of connections.

    uvicorn arms its keep-alive timer only after a response and disarms it at the first byte, so
    a connection that sends nothing, or a head a byte at a time, is held open for ever. So is one
    whose request was answered before its body was read (a 413 by its declared length, a 401, a
    GET with a body) and that then sends a byte of that body now and then: uvicorn discards such
    bytes, and only a new request's head ends the wait. Owned by the event loop.

    uvicorn's own ``limit_concurrency`` (left unset) refuses, at every request head, when its
    open connections or request tasks reach it: idle connections locked out the clients already
    served, the limit itself was never reached (N connections at a limit of N: all refused), and
    each refusal logged a line. ``Admission`` decides once per connection, when it opens.
    """

    head_timeout_s = 10.0  # set per server: make_head_deadline
    admission: Admission | None = None  # one per server: make_head_deadline

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._verdict: Verdict = "serve"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.admission is not None:
            self._verdict = self.admission.enter()
        if self._verdict == "close":
            transport.close()
            return
        if self._verdict == "refuse" and self.admission is not None:
            self.app = self.admission.refusing(self.app)
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

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.admission is not None:
            self.admission.leave(self._verdict)
            self.admission = None  # a connection leaves once (the class's admission still holds)
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


def make_head_deadline(
    timeout_s: float, limit: int | None = None, metrics: ServerMetrics | None = None
) -> type[HeadDeadline]:
    """``HeadDeadline`` with ``timeout_s`` and, given a ``limit``, an ``Admission`` of its own,
    as the class uvicorn instantiates per connection."""
    admission = Admission(limit, metrics) if limit is not None else None
    return type("HeadDeadline", (HeadDeadline,), {"head_timeout_s": timeout_s, "admission": admission})
