"""The daemon: one nursery tree that opens the journal, starts a dispatcher per
destination, binds the listeners, and on SIGTERM/SIGINT drains in reverse order.

Start-up order matters: cursors exist before any event can be acked (so a new
destination sees everything acked after it was configured), and listeners bind last
(so ``/ready`` and the socket mean the whole pipeline is up).
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import signal
import socket as stdlib_socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from router.admin import AdminApi, authorized, serve_admin
from router.admission import load_plans
from router.config import Config, DestinationConfig, load_config
from router.destinations import build, discover
from router.destinations.base import BuildContext, Destination
from router.dispatch import DispatchSettings
from router.errors import RouterError
from router.fleet import Fleet
from router.ingress.http import HttpLimits, HttpServer, Request, Response
from router.ingress.nats import start_nats_sources
from router.ingress.segment import SegmentApi, is_segment_path
from router.ingress.unix import SocketSource, UnixIngress, bind_unix_socket
from router.journal import Journal, open_journal
from router.metrics import CONTENT_TYPE, Latencies, render
from router.pipeline import Pipeline, pipelines
from router.plans import TrackingPlan
from router.reload import ReloadPlan, plan_reload
from router.systemd import Notifier, listen_fds, watchdog_interval
from router.transforms import configured_transforms

log = logging.getLogger(__name__)


def build_destinations(config: Config) -> dict[str, Destination]:
    """Build every configured destination; raises ConfigError on the first that fails."""
    types = discover(config.server.plugin_dirs)
    built: dict[str, Destination] = {}
    for name, dest in config.destinations.items():
        built[name] = build(_build_context(config, dest), types)
    return built


def _build_context(config: Config, dest: DestinationConfig) -> BuildContext:
    return BuildContext(
        name=dest.name,
        type=dest.type,
        options=dest.options,
        data_dir=config.server.data_dir,
        timeout=dest.timeout,
        batch_size=dest.batch_size,
        file=config.file,
        line=dest.line,
    )


@contextmanager
def data_dir_lock(config: Config) -> Iterator[None]:
    """One daemon per data directory: two writers would break every guarantee."""
    data_dir = config.server.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    # "a": opening must not truncate, or a refused second start would erase the holder's pid.
    with open(data_dir / "router.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise RouterError(
                f"another router is running on {data_dir} (it holds {data_dir}/router.lock)"
            ) from exc
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


@dataclass
class Daemon:
    config: Config
    config_path: Path | None = None  # what a reload reads again; None: the embedded default
    ready: bool = False
    segment: SegmentApi | None = None
    unix: UnixIngress | None = None
    http: HttpServer | None = None
    admin: AdminApi | None = None
    fleet: Fleet | None = None
    latencies: Latencies = field(default_factory=Latencies)
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    plans: dict[str, TrackingPlan] = field(default_factory=dict)
    reloads: Counter[str] = field(default_factory=Counter)
    notifier: Notifier = field(default_factory=Notifier.from_environ)
    # Listening sockets systemd handed over (socket activation), by FileDescriptorName.
    activated: dict[str, list[stdlib_socket.socket]] = field(default_factory=dict)
    bound: list[Path] = field(default_factory=list)  # socket files we made, removed at the end

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        self.activated = listen_fds()
        self.plans = load_plans(config)
        destinations = build_destinations(config)
        with data_dir_lock(config):
            async with open_journal(
                config.server.data_dir / "queue.db",
                synchronous=config.queue.synchronous,
                dedupe_window=config.queue.dedupe_window,
                max_bytes=config.queue.max_bytes,
            ) as journal:
                await self._serve(journal, destinations, task_status)
        self.notifier.close()
        log.info("router stopped")

    async def _serve(
        self,
        journal: Journal,
        destinations: dict[str, Destination],
        task_status: trio.TaskStatus[None],
    ) -> None:
        config = self.config
        cursors = await journal.ensure_cursors(list(destinations))
        with (
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
            trio.CancelScope() as dispatch_scope,
        ):
            async with trio.open_nursery() as dispatch_nursery:
                fleet = self.fleet = Fleet(
                    journal, dispatch_nursery, self.latencies, config.server.shutdown_grace
                )
                self.pipelines = pipelines(config, configured_transforms(config))
                for name, destination in destinations.items():
                    settings = _settings(config.destinations[name])
                    await fleet.start(settings, destination, cursors[name], self.pipelines[name])
                prune_scope = trio.CancelScope()
                dispatch_nursery.start_soon(self._prune_loop, journal, prune_scope)
                async with trio.open_nursery() as ingress_nursery:
                    await self._start_admin(journal, ingress_nursery)
                    http = await self._start_ingress(journal, ingress_nursery)
                    start_nats_sources(config, journal, self.plans, ingress_nursery)
                    for name, unused in self.activated.items():
                        for sock in unused:  # a socket unit the config does not listen on
                            log.warning(
                                "systemd passed a socket the config does not use "
                                "name=%s address=%s",
                                name,
                                sock.getsockname(),
                            )
                    self.ready = True
                    log.info("router ready data_dir=%s", config.server.data_dir)
                    # Only now: the queue is open and every listener is bound.
                    self.notifier.ready()
                    ingress_nursery.start_soon(self._tell_systemd)
                    task_status.started()
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            self.notifier.reloading()
                            await self.reload(journal)
                            self.notifier.ready()
                            continue
                        log.info("stopping signal=%s", signal.Signals(signum).name)
                        break
                    self.notifier.stopping()
                    self.ready = False
                    if http is not None:
                        await http.shutdown(config.server.shutdown_grace)
                    ingress_nursery.cancel_scope.cancel()
                for path in self.bound:
                    _remove_socket(path)
                # Deliveries in flight get the grace period; past it they are cut off and
                # retried after the next start (at-least-once).
                fleet.stop_all()
                # Retention has nothing to finish (each step commits, shielded); left running it
                # held every stop for the whole grace period and logged deliveries in flight.
                prune_scope.cancel()
                dispatch_scope.deadline = trio.current_time() + config.server.shutdown_grace
        if dispatch_scope.cancelled_caught:
            log.warning("deliveries were still in flight at the end of the grace period")

    async def _tell_systemd(self) -> None:
        """WATCHDOG=1 from the event loop itself, so a stuck loop misses it and systemd
        restarts us; STATUS= with what an operator wants from `systemctl status`."""
        interval = watchdog_interval()
        if not self.notifier.enabled:
            return
        every = min(interval, 10.0) if interval is not None else 10.0
        last_status = -math.inf
        while True:
            if interval is not None:
                self.notifier.watchdog()
            now = trio.current_time()
            if now - last_status >= 10.0 and self.admin is not None:
                last_status = now
                self.notifier.status(_status_line(await self.admin.handle({"op": "status"})))
            await trio.sleep(every)

    async def _prune_loop(self, journal: Journal, scope: trio.CancelScope) -> None:
        """Retention: every minute, or at once when ingest is refused for space, until ``scope``
        is cancelled. The journal prunes in short steps between ingest commits and logs what
        it did."""
        with scope:
            await self._prune_forever(journal)

    async def _prune_forever(self, journal: Journal) -> None:
        while True:
            queue = self.config.queue
            try:
                report = await journal.prune(
                    now=time.time(), retention=queue.retention, max_bytes=queue.max_bytes
                )
            except RouterError:
                log.exception("prune failed")
                report = None
            if report is not None and not report.complete:
                continue  # its step budget ran out: go on
            with trio.move_on_after(60):
                await journal.wait_refused()

    async def reload(self, journal: Journal) -> bool:
        """Read the config file again and apply it; a bad file keeps the running config."""
        log.info("reloading config=%s", self.config.file)
        try:
            new = self.config if self.config_path is None else load_config(self.config_path)
            plans = load_plans(new)
            plan = plan_reload(self.config, new)
            fresh = {
                name: destination
                for name, destination in build_destinations(new).items()
                if name in plan.start | plan.restart
            }
            routed = pipelines(new, configured_transforms(new))
        except RouterError as exc:
            self.reloads["failed"] += 1
            log.error("reload failed; the running config stays: %s", exc)  # noqa: TRY400
            return False
        for key in plan.needs_restart:
            log.warning("reload cannot change %s: restart router to apply it", key)
        # Settings only a restart can change keep their running values.
        new = msgspec.structs.replace(new, server=self.config.server, queue=self.config.queue)
        await self._apply(journal, new, plan, fresh, routed, plans)
        self.reloads["ok"] += 1
        log.info(
            "reloaded kept=%d restarted=%d started=%d stopped=%d",
            len(plan.keep),
            len(plan.restart),
            len(plan.start),
            len(plan.stop),
        )
        return True

    async def _apply(
        self,
        journal: Journal,
        new: Config,
        plan: ReloadPlan,
        fresh: dict[str, Destination],
        routed: dict[str, Pipeline],
        plans: dict[str, TrackingPlan],
    ) -> None:
        fleet = self.fleet
        assert fleet is not None
        for name in sorted(plan.stop | plan.restart):
            await fleet.stop(name)  # its batches in flight commit first: the cursor is exact
        cursors = await journal.ensure_cursors(sorted(plan.start | plan.restart))
        for name in plan.keep:
            fleet.set_pipeline(name, routed[name])
        for name in sorted(plan.start | plan.restart):
            await fleet.start(
                _settings(new.destinations[name]), fresh[name], cursors[name], routed[name]
            )
        self.config, self.plans = new, plans
        self.pipelines.clear()
        self.pipelines.update(routed)
        if self.admin is not None:
            self.admin.config = new
        if self.segment is not None:
            self.segment.reconfigure(new.http, list(new.sources.values()), plans)
        if self.http is not None:
            self.http.limits = HttpLimits(
                max_body_bytes=new.http.max_request_bytes,
                max_connections=new.http.max_connections,
            )
        if self.unix is not None:
            source = new.sources.get(self.unix.source.name)
            if source is not None:
                self.unix.source = SocketSource(source.name, source.raw, plans.get(source.name))

    async def _start_admin(self, journal: Journal, nursery: trio.Nursery) -> None:
        """The control channel for the CLI: owner-only, so file permissions authenticate."""
        fleet = self.fleet
        assert fleet is not None
        self.admin = AdminApi(self.config, journal, self.pipelines, fleet.wake)
        sock = bind_unix_socket(self.config.server.admin_socket_path, 0o600)
        self.bound.append(self.config.server.admin_socket_path)
        await nursery.start(serve_admin, self.admin, sock)
        nursery.start_soon(self.admin.sample_rates)

    async def _start_ingress(self, journal: Journal, nursery: trio.Nursery) -> HttpServer | None:
        config = self.config
        socket_path = config.server.socket_path
        if socket_path is not None and config.socket_source is not None:
            source = config.sources[config.socket_source]
            sock = self._take("socket")
            if sock is None:  # not socket-activated: ours to bind, and to remove at the end
                sock = bind_unix_socket(socket_path, config.server.socket_mode)
                self.bound.append(socket_path)
            plan = self.plans.get(source.name)
            ingress = self.unix = UnixIngress(
                journal, SocketSource(source.name, source.raw, plan), latencies=self.latencies
            )
            await nursery.start(ingress.serve, sock)
            log.info("listening socket=%s source=%s", socket_path, source.name)
        address = config.server.http_address
        if address is None:
            return None
        self.segment = SegmentApi(
            config.http,
            list(config.sources.values()),
            journal,
            plans=self.plans,
            latencies=self.latencies,
        )
        limits = HttpLimits(
            max_body_bytes=config.http.max_request_bytes,
            max_connections=config.http.max_connections,
        )
        http = self.http = HttpServer(
            self._handle_http, limits=limits, error_headers=self.segment.error_headers
        )
        port = await nursery.start(
            functools.partial(http.serve, inherited=self._take("http")), address[0], address[1]
        )
        log.info("listening http=%s:%s", address[0], port)
        return http

    def _take(self, name: str) -> stdlib_socket.socket | None:
        """A socket systemd passed under ``name``, if it did (socket activation)."""
        passed = self.activated.get(name)
        if not passed:
            return None
        sock = passed.pop(0)
        log.info("using the %s socket from systemd address=%s", name, sock.getsockname())
        return sock

    async def _handle_http(self, request: Request) -> Response:
        if is_segment_path(request.path) and self.segment is not None:
            return await self.segment.handle(request)
        if request.path == "/admin":
            return await self._admin_over_http(request)
        if request.path == "/metrics" and self.admin is not None:
            shown = await self.admin.handle({"op": "status"})
            dropped = self.segment.unauthorized if self.segment is not None else 0
            text = render(
                shown, self.latencies, unauthorized=dropped, reloads=self.reloads
            ).encode()
            return Response(200, text, [("content-type", CONTENT_TYPE)])
        if request.path == "/health":
            return _json(200, {"status": "ok"})
        if request.path == "/ready":
            if self.ready:
                return _json(200, {"status": "ready"})
            return _json(503, {"status": "not ready"})
        return _json(404, {"code": "not_found", "message": f"no route for {request.path}"})

    async def _admin_over_http(self, request: Request) -> Response:
        token = self.config.server.admin_token
        if token is None or self.admin is None:
            return _json(404, {"code": "not_found", "message": "set server.admin_token to use"})
        if not authorized(request.headers.get("authorization"), token.reveal()):
            return _json(401, {"code": "unauthorized", "message": "bearer token required"})
        if request.method != "POST":
            return _json(405, {"code": "method_not_allowed", "message": "POST a JSON request"})
        try:
            body = msgspec.json.decode(request.body)
        except msgspec.DecodeError as exc:
            return _json(400, {"code": "invalid_json", "message": str(exc)})
        if not isinstance(body, dict) or body.get("op") == "tail":
            return _json(400, {"code": "bad_request", "message": "one op, not tail, per request"})
        answer = await self.admin.handle(body)
        return _json(200 if answer.get("ok") else 400, answer)


def _status_line(shown: dict[str, Any]) -> str:
    if not shown.get("ok"):
        return "status unavailable"
    destinations = shown["destinations"].values()
    rate = sum(d["rate_per_second"] or 0 for d in destinations)
    pending = sum(d["pending"] + d["unread"] for d in destinations)
    dead = sum(d["dead_letters"] for d in destinations)
    return f"delivering {rate:.0f} events/s; backlog {pending}; dead letters {dead}"


def _remove_socket(path: Path) -> None:
    # Only on a clean stop: a socket file left behind tells the next start nothing it needs,
    # and the data directory lock means no other router can own it.
    if path.is_socket():
        path.unlink()


def _json(status: int, body: object) -> Response:
    return Response(status, msgspec.json.encode(body))


def _settings(dest: DestinationConfig) -> DispatchSettings:
    return DispatchSettings(
        name=dest.name,
        batch_size=dest.batch_size,
        batch_wait=dest.batch_wait,
        concurrency=dest.concurrency,
        timeout=dest.timeout,
        retry=dest.retry,
    )
