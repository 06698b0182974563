"""What a request to the inference engine gets back, and the errors it may get instead."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from dynft.errors import DynftError
from dynft.events import DEFAULT_TASK


class Overloaded(DynftError):
    """Too many texts are waiting; the client should retry later."""


class NotReady(DynftError):
    """No adapter version has been loaded yet."""


@dataclass(frozen=True)
class Prediction:
    label: str
    scores: dict[str, float]


@dataclass(frozen=True)
class Answer:
    predictions: list[Prediction]
    version: int  # 0: no version yet, the base encoder with prototype rows alone
    fast_path: bool = False  # prototype rows for labels the version lacks took part


class ClientGone(DynftError):
    """The client closed its connection before its answer was ready; the request was withdrawn."""


class UnknownTask(DynftError):
    """A request named a task that has no versions in the registry."""


@dataclass
class Pending:
    """A request waiting in the engine's queue: its texts are answered together, by one version."""

    texts: list[str]
    future: Future[Answer]
    task: str = DEFAULT_TASK
