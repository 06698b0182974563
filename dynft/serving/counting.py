"""Every request counted by its answer's status (``dynft_requests_total``), as pure ASGI middleware.

The outermost layer: it sees the 500 that ``limits.InternalErrors`` makes of an unforeseen error,
the 413 and 408 of the body limits, and the 499 of a request whose client left. A query
parameter given twice is refused here, before any route reads one of its values (a gateway that
read the first value must not see another one acted on).

Written as plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one wraps every
``receive`` in a task group of its own, about 80 µs per request on the 2-core machine.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dynft.metrics import ServerMetrics
from dynft.serving.checks import repeated_query
from dynft.serving.limits import error_response


class CountRequests:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        twice = repeated_query(Request(scope))
        if twice is not None:
            self.metrics.requests.labels("422").inc()
            message = f"query parameter {twice[:64]!r} is given twice"
            await error_response(422, "invalid_request", message)(scope, receive, send)
            return
        counted = False

        async def counting(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start":
                counted = True
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except Exception:
            if not counted:  # no answer was begun: the client gets none, the count says 500
                self.metrics.requests.labels("500").inc()
            raise
