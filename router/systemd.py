"""The systemd protocols router speaks, with the standard library only.

Owns: ``sd_notify`` (one datagram per message to ``$NOTIFY_SOCKET``, a path or an abstract
socket), the watchdog interval asked for by ``WATCHDOG_USEC``/``WATCHDOG_PID``, and the sockets
handed over by socket activation (``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``), with the
semantics of libsystemd's ``sd_notify``, ``sd_watchdog_enabled`` and
``sd_listen_fds_with_names``.

It must not decide *when* to notify (the daemon does: READY=1 once the queue is open and the
listeners are bound, WATCHDOG=1 from the event loop so that a stuck loop misses it), and it never
raises because systemd is absent or gone: outside systemd every call is a cheap no-op.

Usage::

    notifier = Notifier.from_environ()   # or the module-level notify(state)
    notifier.ready()
    interval = watchdog_interval()       # None: no watchdog asked for
    ...
    notifier.watchdog()                  # every `interval` seconds, from the event loop
    notifier.reloading()                 # then notifier.ready() once the new config runs
    notifier.status("12 events/s, backlog 0")
    notifier.stopping()
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

from router.errors import RouterError

log = logging.getLogger(__name__)

# The first fd passed by socket activation (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
# A send to the notify socket blocks only when systemd's receive queue is full. It is called
# from the event loop, so it may stall it this long at worst; past that the message is dropped
# (a missed WATCHDOG=1 is retried at the next tick, well before the watchdog fires).
_SEND_TIMEOUT = 1.0


class SystemdError(RouterError):
    """What systemd handed over cannot be used (malformed LISTEN_FDS, an fd that is no socket)."""


class Notifier:
    """Sends sd_notify messages to one address, over one socket kept open for its lifetime.

    ``address`` is ``$NOTIFY_SOCKET`` as systemd sets it: a path, or ``@name`` for an abstract
    socket. With no address every method returns False and does nothing.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._target: str | bytes | None = _target(self.address) if self.address else None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (``KEY=VALUE`` lines); True if systemd's socket took it."""
        if self._target is None:
            return False
        try:
            if self._sock is None:
                # Unconnected: each datagram goes to the path as it is now, so a notify socket
                # that systemd re-creates (daemon-reexec) is found again.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(_SEND_TIMEOUT)
            self._sock.sendto(state.encode(), self._target)
        except OSError as exc:
            # systemd gone, not listening, or the path wrong: nothing a daemon can do about it,
            # and nothing that should stop it serving.
            log.debug("sd_notify failed address=%s error=%s", self.address, exc)
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def reloading(self, monotonic_usec: int | None = None) -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC time it began (systemd >= 253 requires it)."""
        if monotonic_usec is None:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=, shown by ``systemctl status``; one line, so newlines become spaces."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# One Notifier per address for notify(): it is called every few seconds, and a socket per call
# would be a waste (and, in a loop without pauses, a way to run out of fds).
_shared: dict[str, Notifier] = {}


@atexit.register
def _close_shared() -> None:
    for notifier in _shared.values():
        notifier.close()
    _shared.clear()


def notify(state: str, *, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` to ``$NOTIFY_SOCKET``; False when it is unset or the send failed."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    notifier = _shared.get(address)
    if notifier is None:
        notifier = _shared[address] = Notifier(address)
    return notifier.notify(state)


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WATCHDOG_USEC``), or None if none is asked.

    As ``sd_watchdog_enabled``: a ``WATCHDOG_PID`` naming another process (the variables were
    inherited, not meant for us) means no watchdog. Malformed values mean none too.
    """
    usec = _positive_int(environ.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and _positive_int(pid) != os.getpid():
        return None
    return usec / 2 / 1_000_000


def listen_fds(
    environ: MutableMapping[str, str] = os.environ,
) -> dict[str, list[socket.socket]]:
    """The sockets passed by socket activation, by ``FileDescriptorName=`` ("unknown" if unnamed).

    As ``sd_listen_fds_with_names(unset_environment=1)``: only for this process (``LISTEN_PID``),
    fds from 3 on, marked close-on-exec, and the variables are removed from ``environ`` whatever
    the outcome, so that no child process takes them for its own. Raises SystemdError when
    ``LISTEN_FDS`` is malformed or an fd is not a socket: a daemon that ignored sockets it was
    handed would leave clients of the socket unit unanswered.
    """
    pid = environ.pop("LISTEN_PID", None)
    count_text = environ.pop("LISTEN_FDS", None)
    names_text = environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count_text is None or _positive_int(pid) != os.getpid():
        return {}
    try:
        count = int(count_text)
    except ValueError:
        count = -1
    if count < 0:
        raise SystemdError(f"LISTEN_FDS is not a count of file descriptors: {count_text!r}")
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        # sd_listen_fds_with_names refuses this outright; naming what we can is kinder, and
        # the daemon still checks each socket's family before use.
        log.warning("LISTEN_FDNAMES names %d fds, LISTEN_FDS says %d", len(names), count)
    found: dict[str, list[socket.socket]] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            os.set_inheritable(fd, False)
            # fileno= alone: the family, type and protocol are read from the socket itself.
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SystemdError(f"fd {fd} ({name}) from socket activation: {exc}") from exc
        found.setdefault(name, []).append(sock)
    return found


def _target(address: str) -> str | bytes:
    # "@name" is an abstract socket: a leading NUL byte on the wire, not a file.
    return b"\0" + address[1:].encode() if address.startswith("@") else address


def _positive_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value > 0 else None
