"""Versions on Kafka: the trainer's feed and the serving replicas that follow it.

``records`` encodes versions and serving pointers as Kafka records, ``topics`` creates and
checks the two compacted topics, ``found`` reads what they hold at a start, ``feed`` is the
trainer's side and ``follower`` a replica's (with ``following``, the replica's registry).
"""
