"""Crash recovery: settle the reservations a dead service instance left behind.

Every running service process (embedded, standalone, each replica) registers itself in the store and marks
each reservation it takes with its id. A reservation left unsettled by an instance that is gone never produced
an answer that left the service, so it is refunded, with the reason in the ledger. An instance counts as dead
only when that is certain on this machine (its process is gone or its pid now belongs to another process), or,
for an instance on another machine, when it has missed heartbeats for `stale_after` seconds.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timezone

from ..store import AdminStore, InstanceRecord
from ..store.base import utcnow


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when no such process runs (a zombie,
    killed but not yet reaped by its parent, runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]  # state, and field 22 of stat (the split drops pid, comm)
    except (OSError, IndexError):
        return None


def this_instance() -> InstanceRecord:
    now = utcnow()
    pid = os.getpid()
    return InstanceRecord(uuid.uuid4().hex, socket.gethostname(), pid, process_start(pid) or "", now, now)


def is_dead(instance: InstanceRecord, stale_after: float, now: datetime | None = None) -> bool:
    if instance.hostname == socket.gethostname() and os.path.isdir("/proc"):
        return process_start(instance.pid) != instance.process_start
    now = now or datetime.now(timezone.utc)
    return (now - datetime.fromisoformat(instance.heartbeat_at)).total_seconds() > stale_after


def settle_abandoned(store: AdminStore, me: InstanceRecord, stale_after: float, at_start: bool = False) -> int:
    """Refund what dead instances left pending; returns how many reservations were settled. At start, also
    what was reserved before reservations had owners (no service of this version can hold those)."""
    settled = 0
    if at_start:
        settled += store.retire_instance(None, "refunded at start: reserved before the service recorded owners, "
                                         "and never settled")
    for instance in store.running_instances():
        if instance.id != me.id and is_dead(instance, stale_after):
            settled += store.retire_instance(
                instance.id, "refunded: the service process that held this reservation stopped before the "
                "release left it")
    return settled
