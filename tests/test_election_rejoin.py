"""The election's last resort for a join that never ends, with the real broker."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from dynft import election as election_module
from dynft.devbroker import Broker
from dynft.election import Election
from dynft.settings import Settings

from kafka_helpers import kafka_settings, new_topic, start_and_hold, wait_until


def settled(election: Election) -> None:
    """Wait until the group has been quiet for a while: a first join is often followed by a second
    rebalance (the topic's metadata arriving), whose assignment would end a revocation given by hand."""
    quiet = lambda: election._unassigned_since is None and time.monotonic() - election._quiet_since > 5  # noqa: E731
    wait_until(quiet, 60, "no rebalance news for 5 s")


def test_a_revocation_no_assignment_follows_is_healed_by_a_new_member_and_the_term_resumes(
    kafka_broker: Broker, tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose partitions were revoked and never assigned again (a join that never ends; the
    known kafka-python causes are fixed in ``kafka_compat``, so the revocation is handed to the
    election as its listener would, with no rebalance behind it) joins afresh with a new consumer
    once a rebalance could no longer be under way; the new member is given the term partition and
    the same term resumes, since no later term record was written."""
    monkeypatch.setattr(election_module, "REJOIN_MARGIN_S", 1.0)
    settings = kafka_settings(tiny_settings, kafka_broker, new_topic(kafka_broker, 1), f"g-{uuid.uuid4().hex[:6]}")
    settings.kafka.versions_topic = f"versions-{uuid.uuid4().hex[:8]}"
    # Long enough that no poll of a loaded machine overruns it: a real rebalance would bring an
    # assignment after the revocation given below, and nothing would be stuck.
    settings.kafka.max_poll_interval_ms = 10_000
    settings.kafka.session_timeout_ms = 6000  # the broker's shortest
    election = Election(settings, "host:1")
    try:
        view = start_and_hold(election)
        settled(election)
        first, epoch = election._consumer, election.epoch
        election._news.put(("revoked", frozenset({0})))
        wait_until(lambda: not election.holding, 10, "the revocation to suspend the term")
        wait_until(lambda: election._consumer is not first, 45, "a new consumer after 10 + 6 + 1 s without partitions")
        wait_until(lambda: election.holding, 60, "the new member to resume the term")
        assert election.epoch == epoch and not election.lost and view.current()
        assert election.held()  # no later term record: the trainer may send again
    finally:
        election.close()


def test_a_standby_whose_join_never_ends_joins_afresh_and_takes_over(
    kafka_broker: Broker, tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby holds nothing, so its rebalances revoke an empty set; that is news too, and a join
    of the standby that never ends is healed like the holder's: the standby then takes the term
    when the active trainer goes."""
    monkeypatch.setattr(election_module, "REJOIN_MARGIN_S", 1.0)
    settings = kafka_settings(tiny_settings, kafka_broker, new_topic(kafka_broker, 1), f"g-{uuid.uuid4().hex[:6]}")
    settings.kafka.versions_topic = f"versions-{uuid.uuid4().hex[:8]}"
    settings.kafka.max_poll_interval_ms = 10_000  # a rebalance waits this long for a member: 1 s dropped the active one
    settings.kafka.session_timeout_ms = 6000
    active, standby = Election(settings, "host:1"), Election(settings, "host:2")
    stop = threading.Event()
    give_up = threading.Timer(120, stop.set)
    give_up.start()
    try:
        active.start()
        assert active.wait(stop) is not None
        standby.start()
        wait_until(lambda: standby._unassigned_since is None, 30, "the standby's first (empty) assignment")
        settled(active)
        settled(standby)
        assert not standby.holding and active.holding  # sticky: the joining standby takes nothing
        first = standby._consumer
        standby._news.put(("revoked", frozenset()))  # as its listener reports a standby's revocation
        wait_until(lambda: standby._consumer is not first, 45, "the standby to join afresh after 10 + 6 + 1 s")
        wait_until(lambda: standby._unassigned_since is None, 30, "the new member's assignment")
        active.close()  # the active trainer goes: its member leaves the group
        view = standby.wait(stop)
        assert view is not None and standby.holding and standby.epoch == active.epoch + 1
    finally:
        give_up.cancel()
        standby.close()
        active.close()
