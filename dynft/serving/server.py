"""The server process: the inference engine behind uvicorn, with uvicorn's own lifecycle.

uvicorn installs the SIGINT/SIGTERM handlers, stops accepting connections, lets in-flight
requests finish (``timeout_graceful_shutdown``) and returns; the engine stops after it.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch
import uvicorn
from prometheus_client import CollectorRegistry

from dynft.errors import ConfigError
from dynft.metrics import ServerMetrics
from dynft.registry import AdapterRegistry
from dynft.replication.follower import Follower
from dynft.replication.following import FollowingRegistry
from dynft.runtime import tune_gc
from dynft.serving.app import create_app
from dynft.serving.engine import InferenceEngine
from dynft.serving.limits import make_head_deadline
from dynft.settings import Settings
from dynft.statedir import admin_token

log = logging.getLogger(__name__)


class Server:
    """Builds the engine and the app; ``run`` blocks until a signal (or ``should_exit``) stops it."""

    def __init__(
        self,
        settings: Settings,
        metrics_registry: CollectorRegistry | None = None,
        follow: str | None = None,
        registry_dir: Path | None = None,
    ) -> None:
        """``follow``: ``kafka://HOST:PORT/TOPIC`` of the versions topic, for a replica (no trainer, no
        shared disk); ``registry_dir``: where its registry is (default: ``settings.registry_dir``)."""
        self.settings = settings
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = ServerMetrics(self.metrics_registry)
        registry_dir = registry_dir or settings.registry_dir
        kind = AdapterRegistry if follow is None else FollowingRegistry
        self.registry = kind(registry_dir, settings.registry.keep_last, settings.registry.keep_serving_history)
        self.follower: Follower | None = None
        if isinstance(self.registry, FollowingRegistry) and follow is not None:
            self.follower = self.registry.follower = Follower(settings, self.registry, follow, self.metrics_registry)
        self.engine = InferenceEngine(settings, self.registry, self.metrics)
        if self.follower is not None:
            self.follower.on_change = self.engine.nudge
            self.engine.task_registry = self.follower.registry_of
        self.app = create_app(
            settings,
            self.engine,
            self.registry,
            self.metrics,
            self.metrics_registry,
            admin_token(settings),
            stopping=lambda: bool(self.uvicorn.should_exit),
        )
        config = uvicorn.Config(
            self.app,
            host=settings.server.host,
            port=settings.server.port,
            log_level=settings.log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=10,
            lifespan="off",
            # No WebSocket routes; and a connection upgraded to one would leave dynft's protocol
            # without connection_lost, keeping its place among the admitted connections for ever.
            ws="none",
            # dynft's protocol admits connections itself (server.limit_concurrency served at once,
            # new ones beyond refused); uvicorn's own limit would refuse those already served.
            limit_concurrency=None,
            http=make_head_deadline(settings.server.header_timeout_s, settings.server.limit_concurrency, self.metrics),
        )
        self.uvicorn = uvicorn.Server(config)

    def run(self, sock: socket.socket | None = None) -> None:
        torch.set_num_threads(self.settings.server.threads)
        tune_gc()
        if self.follower is not None and not self._start_following():
            self.follower.stop()
            return
        self.engine.start()
        try:
            self.uvicorn.run(sockets=[sock] if sock is not None else None)
        except SystemExit as exc:
            if self.uvicorn.started:
                raise
            # uvicorn logged why (with lifespan off, only binding fails at startup) and exits 3,
            # which a supervisor would take for a crash and restart forever: a port in use or a
            # host that is not this machine's is the configuration's to change.
            s = self.settings.server
            raise ConfigError(f"server.host/server.port: cannot listen on {s.host}:{s.port} (see above)") from exc
        finally:
            self.engine.stop()
            if self.follower is not None:
                self.follower.stop()

    def _start_following(self) -> bool:
        """The follower's start: it waits for the brokers, then reads the versions topics to their
        end (the current version is then here). SIGINT or SIGTERM meanwhile ends the run cleanly:
        uvicorn installs its own handlers only once it runs."""
        follower = self.follower
        assert follower is not None
        with on_stop_signals(lambda *_: follower.cancel()):
            started = follower.start()
        return started and not follower.cancelled  # a signal just before the handlers went back counts too

    def stop(self) -> None:
        self.uvicorn.should_exit = True

    @property
    def started(self) -> bool:
        return bool(self.uvicorn.started)


@contextmanager
def on_stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM meanwhile (in the main thread: only it takes signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
