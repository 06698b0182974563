"""A trainer's term as the rest of the daemon obeys it: the topics that hold terms, the partition
of a task, the view of one term (``TermView``), and the fences a term puts on commits and on an
old checkpoint. The election that grants terms is ``dynft.election``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dynft.events import DEFAULT_TASK
from dynft.registry import AdapterRegistry
from dynft.sources.base import Source
from dynft.sources.kafka import KafkaSource
from dynft.sources.kafka_process import KafkaProcessSource

if TYPE_CHECKING:
    from dynft.election import Election

log = logging.getLogger(__name__)


def term_topic(versions_topic: str) -> str:
    return f"{versions_topic}.term"


def shard_topic(versions_topic: str) -> str:
    return f"{versions_topic}.shards"


def task_partition(task: str, partitions: int) -> int:
    """The partition a producer keying its records by ``task`` sends them to (Kafka's default partitioner).

    >>> task_partition("default", 1), 0 <= task_partition("intents", 4) < 4
    (0, True)
    """
    from kafka.partitioner.default import murmur2

    return int(murmur2(task.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class TermView:
    """One term (a trainer's *life* when sharded): its epoch and partitions, fixed while it lasts."""

    election: Election
    generation: int
    epoch: int
    partitions: frozenset[int]

    def held(self, task: str = DEFAULT_TASK) -> bool:
        """Whether records of ``task`` may still be sent under this term (one broker round trip)."""
        return self.current() and self.election.held(task)

    def current(self) -> bool:
        """Whether this is still the election's term: no reassignment since it began, not lost (a
        rebalance that gives the same partitions back only suspends it, see ``may_commit``)."""
        e = self.election
        return e.generation == self.generation and not e.lost and e.ended_generation != self.generation

    def may_commit(self) -> bool:
        """Whether offsets may be committed under this term now: current, and not suspended by a rebalance."""
        return self.current() and self.election.holding

    def owns(self, task: str) -> bool:
        return self.election.partition_of(task) in self.partitions

    def shard(self, task: str) -> int:
        """The shard ``task``'s records are fenced in (``replication.records``): its partition, or 0."""
        return self.election.partition_of(task)


def fence_commits(source: Source, term: TermView) -> None:
    """``source`` commits only while ``term`` lasts (the next term's trainer commits), and, when
    sharded, consumes only the term's partitions of the source topic."""
    if isinstance(source, KafkaSource | KafkaProcessSource):
        source.may_commit = term.may_commit
        if term.election.sharded:
            source.partitions = term.partitions


def outdated(checkpoint_state: dict[str, Any], registry: AdapterRegistry) -> bool:
    """Whether a checkpoint predates a version in ``registry`` (another trainer's, from the versions topic).

    An elected trainer that held the term before resumes from the newest published version then,
    not from its own older state: its next version must descend from the newest one.
    """
    latest = checkpoint_state.get("publisher", {}).get("latest_version") or 0
    newest = max(registry.versions(), default=0)
    if newest > latest:
        log.warning(
            "the checkpoint knows versions up to %d, the versions topic %d: resuming from the topic", latest, newest
        )
    return newest > latest
