"""What a reload (SIGHUP) changes: which destinations keep running, restart, start or stop.

Pure: compares the running config with the new one. A destination whose own settings are the
same keeps its dispatcher and only takes the new routes (its pipeline is swapped between
batches); one whose settings changed is stopped after its batches in flight and started again
from its committed cursor, so nothing is sent twice or skipped. Settings that only a restart
can change (where the queue lives, what is listened on) are named, and keep their old values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from router.config import Config, DestinationConfig


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    keep: frozenset[str]  # same settings: swap the pipeline only
    restart: frozenset[str]  # settings changed: stop, then start from the cursor
    start: frozenset[str]  # new destinations
    stop: frozenset[str]  # removed destinations
    needs_restart: tuple[str, ...] = field(default=())  # sections a reload cannot apply


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    before, after = old.destinations, new.destinations
    shared = before.keys() & after.keys()
    same = frozenset(name for name in shared if _same(before[name], after[name]))
    return ReloadPlan(
        keep=same,
        restart=frozenset(shared - same),
        start=frozenset(after.keys() - before.keys()),
        stop=frozenset(before.keys() - after.keys()),
        needs_restart=_fixed_changes(old, new),
    )


def _same(a: DestinationConfig, b: DestinationConfig) -> bool:
    # The line a section starts on moves when lines are added above it; that is no change.
    return msgspec.structs.replace(a, line=0) == msgspec.structs.replace(b, line=0)


def _fixed_changes(old: Config, new: Config) -> tuple[str, ...]:
    fixed = ("data_dir", "http", "socket", "socket_mode", "plugin_dirs", "admin_token")
    changed = [
        f"server.{key}" for key in fixed if getattr(old.server, key) != getattr(new.server, key)
    ]
    if old.queue != new.queue:
        changed.append("queue")
    if old.socket_source != new.socket_source:
        changed.append("which source takes the socket")
    # A NATS consumer runs with the settings and tracking plan it started with.
    for name in sorted(old.sources.keys() | new.sources.keys()):
        before, after = old.sources.get(name), new.sources.get(name)
        pulled = (before is not None and before.nats is not None) or (
            after is not None and after.nats is not None
        )
        if pulled and before != after:
            changed.append(f"sources.{name} (a nats source)")
    return tuple(changed)
