"""`GET /metrics`: the status view and two latency histograms in Prometheus' text format.

Counts come from the queue database (the same numbers `router status` shows, so they survive
restarts and agree with each other); latencies are this process's own observations. The text
format is small enough to write here rather than take a client library for it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: commits are sub-millisecond to tens of ms (fsync); deliveries ms to the timeout.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    observations: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self.buckets, seconds)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += seconds
        self.observations += 1

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {cumulative}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.observations}'
        yield f"{name}_sum{_braces(labels)} {self.total:.6f}"
        yield f"{name}_count{_braces(labels)} {self.observations}"


@dataclass(slots=True)
class Latencies:
    """What this process measured: journal commits, and delivery attempts per destination."""

    commit: Histogram = field(default_factory=Histogram)
    delivery: dict[str, Histogram] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)

    def delivered_in(self, destination: str, seconds: float) -> None:
        self.delivery.setdefault(destination, Histogram()).observe(seconds)


def render(
    status: Mapping[str, Any],
    latencies: Latencies,
    *,
    unauthorized: int = 0,
    reloads: Mapping[str, int] | None = None,
) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    sources: Mapping[str, Mapping[str, int]] = status["sources"]
    family("router_source_received_total", "counter", "Events received per source.")
    for source, counts in sources.items():
        out.append(f"router_source_received_total{{source={_q(source)}}} {sum(counts.values())}")
    family("router_source_events_total", "counter", "Events per source by outcome.")
    for source, counts in sources.items():
        for outcome, n in counts.items():
            out.append(
                f"router_source_events_total{{source={_q(source)},outcome={_q(outcome)}}} {n}"
            )

    family(
        "router_unauthorized_events_total",
        "counter",
        "Events dropped for an unknown or missing write key, since start.",
    )
    out.append(f"router_unauthorized_events_total {unauthorized}")

    destinations: Mapping[str, Mapping[str, Any]] = status["destinations"]
    for key, help_text in (
        ("routed", "Events routed to the destination."),
        ("delivered", "Events the destination accepted."),
        ("dead_lettered", "Events given up on."),
        ("filtered", "Events held back by routes, integrations, filters or transforms."),
    ):
        name = f"router_destination_{key}_total"
        family(name, "counter", help_text)
        out += [f"{name}{{destination={_q(d)}}} {v[key]}" for d, v in destinations.items()]
    family("router_destination_retried_total", "counter", "Retry attempts since start.")
    out += [
        f"router_destination_retried_total{{destination={_q(d)}}} {latencies.retried.get(d, 0)}"
        for d in destinations
    ]
    family("router_destination_held_total", "counter", "Held-back events by reason.")
    for d, values in destinations.items():
        for reason, n in values["held_back"].items():
            out.append(
                f"router_destination_held_total{{destination={_q(d)},reason={_q(reason)}}} {n}"
            )
    for key, name, help_text in (
        ("pending", "router_destination_pending", "Events routed, not yet delivered or given up."),
        ("unread", "router_destination_unread", "Logged events the destination has not read."),
        ("dead_letters", "router_destination_dead_letters", "Dead letters held."),
        ("backlog_age_seconds", "router_destination_backlog_age_seconds", "Oldest waiting."),
    ):
        family(name, "gauge", help_text)
        out += [f"{name}{{destination={_q(d)}}} {_number(v[key])}" for d, v in destinations.items()]

    journal: Mapping[str, Any] = status["journal"]
    family("router_journal_bytes", "gauge", "Size of the queue database and its WAL.")
    out.append(f"router_journal_bytes {journal['bytes']}")
    family("router_journal_events", "gauge", "Events in the queue (kept for replay).")
    out.append(f"router_journal_events {journal['events']}")

    family("router_reloads_total", "counter", "Config reloads (SIGHUP) by result, since start.")
    for result in ("ok", "failed"):
        out.append(f'router_reloads_total{{result="{result}"}} {(reloads or {}).get(result, 0)}')

    family("router_commit_seconds", "histogram", "Journal commit latency (ack waits on it).")
    out += latencies.commit.lines("router_commit_seconds")
    family("router_delivery_seconds", "histogram", "Delivery attempt latency.")
    for d, histogram in latencies.delivery.items():
        out += histogram.lines("router_delivery_seconds", f"destination={_q(d)}")
    return "\n".join(out) + "\n"


def _q(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return f'"{escaped}"'


def _braces(labels: str) -> str:
    return f"{{{labels}}}" if labels else ""


def _number(value: Any) -> str:
    # An absent age means nothing waits: 0, which is what an alert on it should see.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "0"
    return f"{value:g}"
