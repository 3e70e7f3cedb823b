"""The running dispatchers, one per destination: started, given new routes, stopped, by name.

A dispatcher is stopped in two steps: it stops reading, its batches in flight finish and
commit (so its cursor is exact), and only past the grace period is it cancelled (what was cut
off is sent again after restart: at-least-once). That is what lets a reload swap a
destination without losing or repeating an event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from router.destinations.base import Destination
from router.dispatch import Dispatcher, DispatchSettings
from router.journal import Journal
from router.metrics import Latencies
from router.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Running:
    dispatcher: Dispatcher
    scope: trio.CancelScope
    done: trio.Event


class Fleet:
    def __init__(
        self, journal: Journal, nursery: trio.Nursery, latencies: Latencies, grace: float
    ) -> None:
        self._journal = journal
        self._nursery = nursery
        self._latencies = latencies
        self.grace = grace
        self._running: dict[str, _Running] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._running

    @property
    def names(self) -> list[str]:
        return list(self._running)

    async def start(
        self,
        settings: DispatchSettings,
        destination: Destination,
        cursor: int,
        pipeline: Pipeline,
    ) -> None:
        if not pipeline.routes:
            log.warning(
                "destination has no route: it takes replays only destination=%s", settings.name
            )
        dispatcher = Dispatcher(
            settings,
            destination,
            self._journal,
            cursor=cursor,
            pipeline=pipeline,
            latencies=self._latencies,
        )
        running = _Running(dispatcher, trio.CancelScope(), trio.Event())

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with running.scope:
                    await dispatcher.run(task_status=task_status)
            finally:
                running.done.set()

        self._running[settings.name] = running
        await self._nursery.start(run)

    def set_pipeline(self, name: str, pipeline: Pipeline) -> None:
        self._running[name].dispatcher.set_pipeline(pipeline)

    def wake(self, name: str) -> None:
        running = self._running.get(name)
        if running is not None:
            running.dispatcher.retries_changed()

    async def stop(self, name: str) -> None:
        """Stop one dispatcher: in-flight batches get the grace period, then are cut off."""
        running = self._running.pop(name)
        running.dispatcher.stop()
        with trio.move_on_after(self.grace):
            await running.done.wait()
        if not running.done.is_set():
            log.warning("deliveries still in flight after the grace period destination=%s", name)
            running.scope.cancel()
            await running.done.wait()

    def stop_all(self) -> None:
        """Stop reading everywhere; the caller bounds how long batches in flight may take."""
        for running in self._running.values():
            running.dispatcher.stop()
