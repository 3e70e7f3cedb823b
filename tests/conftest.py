"""Fixtures the daemon-level tests share: a loopback webhook receiver, and daemons that are
killed at the end of a test if it left them running."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Daemon, Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
