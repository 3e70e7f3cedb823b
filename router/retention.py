"""What the pruner may delete from the log, and when disk pressure overrides retention.

Pure decisions, no I/O: the journal reads the numbers (cursors, sizes, a slice of the log),
asks here, and deletes what it is told. An event may go only when

- every destination is done with it: its seq is at or below the lowest cursor (with no
  destinations at all, nobody needs it, so the whole log qualifies);
- no destination holds it in its retry set (dead letters keep their own copy of the body,
  so they do not pin it);
- and it is old enough, or the queue is under disk pressure.

Old enough means older than ``retention`` and than the dedupe window: dedupe finds an earlier
copy of a messageId in the log, so pruning inside the window would let a client's retry
through as a second event. Under pressure (the live size above 90% of ``max_bytes``)
delivered events go oldest first whatever their age, because refusing new events is worse
than losing replay history; the journal logs how much history that cut.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

# Above this share of max_bytes, delivered history goes regardless of age...
PRESSURE = 0.9
# ...until the live size is back under this share. Stopping at 90% would leave ingest a few
# seconds of headroom at full speed before the next refusal; the gap is the hysteresis.
RELIEF = 0.8


def age_cutoff(now: float, retention: float, dedupe_window: float) -> float:
    """Events received before this may go for their age alone."""
    return now - max(retention, dedupe_window)


def prune_bound(cursors: Collection[int], head: int) -> int:
    """The newest seq that every destination is done with."""
    return min(cursors, default=head)


def under_pressure(live_bytes: int, max_bytes: int, *, relieving: bool) -> bool:
    """Whether the live size forces pruning of young history. ``relieving``: this prune has
    already been forcing, so it goes on down to RELIEF rather than stopping at PRESSURE."""
    return live_bytes > (RELIEF if relieving else PRESSURE) * max_bytes


@dataclass(frozen=True, slots=True)
class Choice:
    """What to do with one slice of the log."""

    delete: list[int]  # seqs, ascending
    forced: int  # how many of those are young: deleted only because of pressure
    newest_forced: float | None  # received_at of the youngest of those, for the warning
    scanned_to: int  # the last seq looked at: the next slice starts after it
    finished: bool  # nothing further in the log can go now


def choose(
    rows: Sequence[tuple[int, float]],
    pinned: Collection[int],
    *,
    cutoff: float,
    pressure: bool,
    more: bool,
) -> Choice:
    """Which of ``rows`` (seq, received_at), the next slice of the log in seq order and all at
    or below the prune bound, to delete. ``pinned``: seqs in some retry set. ``more``: the
    slice was cut at its size limit, so rows beyond it exist below the bound.

    Without pressure the scan stops at the first row too young to go: the log is in arrival
    order, so what follows is younger still. Where that order is broken (a dead letter
    restored with its original time, the clock stepping back), rows wait for a later prune;
    nothing goes early.
    """
    delete: list[int] = []
    forced = 0
    newest_forced: float | None = None
    for seq, received_at in rows:
        young = received_at >= cutoff
        if young and not pressure:
            return Choice(delete, forced, newest_forced, seq - 1, finished=True)
        if seq in pinned:
            continue
        delete.append(seq)
        if young:
            forced += 1
            newest_forced = max(received_at, newest_forced or received_at)
    scanned_to = rows[-1][0] if rows else 0
    return Choice(delete, forced, newest_forced, scanned_to, finished=not more)


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What one prune did."""

    pruned: int  # events deleted from the log
    forced: int  # of those, younger than retention: deleted only because of disk pressure
    forced_up_to: float | None  # received_at of the youngest of those
    pressure: bool  # the live size was over PRESSURE at some step
    freed_bytes: int  # what the deleted events held: room for new events at once
    reclaimed_bytes: int  # handed back to the filesystem by incremental vacuum
    live_bytes: int  # the live size afterwards (what ingest's max_bytes check counts)
    complete: bool  # False: the step budget ran out first; call again soon


@dataclass(slots=True)
class Progress:
    """A prune so far, summed over its steps."""

    pruned: int = 0
    forced: int = 0
    forced_up_to: float | None = None
    freed_pages: int = 0
    pressure: bool = False  # forced at some step
    relieving: bool = False  # the last step was under pressure: go on down to RELIEF
    after: int = 0  # the next step starts after this seq
    complete: bool = False

    def add(self, choice: Choice, *, pressure: bool, freed_pages: int) -> None:
        self.pruned += len(choice.delete)
        self.forced += choice.forced
        if choice.newest_forced is not None:
            self.forced_up_to = max(choice.newest_forced, self.forced_up_to or 0.0)
        self.freed_pages += freed_pages
        self.pressure |= pressure
        self.relieving = pressure
        self.after = choice.scanned_to
        self.complete = choice.finished

    def report(self, *, page_size: int, reclaimed_pages: int, live_bytes: int) -> PruneReport:
        return PruneReport(
            pruned=self.pruned,
            forced=self.forced,
            forced_up_to=self.forced_up_to,
            pressure=self.pressure,
            freed_bytes=self.freed_pages * page_size,
            reclaimed_bytes=reclaimed_pages * page_size,
            live_bytes=live_bytes,
            complete=self.complete,
        )


def warnings(report: PruneReport, *, now: float, retention: float, max_bytes: int) -> list[str]:
    """What an operator must hear about a prune: history cut short, or no room made."""
    found: list[str] = []
    if report.forced_up_to is not None:
        found.append(
            f"queue over {PRESSURE:.0%} of max_bytes: pruned {report.forced} delivered events "
            f"younger than retention; replay history now reaches back "
            f"{now - report.forced_up_to:.0f} s instead of {retention:.0f} s, and a client "
            "retrying an event that old would no longer be recognised as a duplicate"
        )
    if report.complete and report.live_bytes > PRESSURE * max_bytes:
        found.append(
            f"queue still at {report.live_bytes / max_bytes:.0%} of max_bytes after pruning: "
            "what is left waits for a destination (`router status` shows which has the "
            "backlog) and ingest is refused at 100%"
        )
    return found
