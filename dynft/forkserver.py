"""Imported last by the fork server (``dynft.supervisor.PRELOAD``): freezes what the imports made.

Every child of ``dynft run`` is forked from the fork server and shares its pages until it writes
to them. A full garbage collection in a child writes to the header of every object it tracks,
which would copy every page of the fork server's heap into the child; ``gc.freeze`` moves the
imported modules' objects out of the collector's sight before any fork, so they stay shared.
Importing this module is the only way to run code in the fork server between its preload and
its first fork, hence the side effect.
"""

from __future__ import annotations

from dynft.runtime import freeze

freeze()
