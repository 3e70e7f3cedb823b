"""A throwaway PostgreSQL server for tests and benchmarks: its own data directory, a free port on
127.0.0.1, trust auth for the role ``router``, stopped by PID and restartable on the same port
and directory (a restart mid-stream is one of the things the tests do to it).

Postgres refuses to run as root, so when this process is root the server runs as the
``postgres`` system user, in a directory under /tmp that user owns (pytest's tmp dirs are
private to root). Missing binaries fail the test with a message, never skip it: CI installs
them, and a warehouse test that passes without a warehouse proves nothing.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg


def find_bin_dir() -> Path:
    """Where ``initdb`` and ``postgres`` are: $PG_BIN, Debian's versioned dirs, or PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    candidates.append(str(Path(found).parent) if found else "")
    for candidate in filter(None, candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "postgres").exists():
            return Path(candidate)
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, postgres) not found: install them "
        "(apt-get install postgresql) or set PG_BIN to their directory"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One server: ``start()``, ``stop()`` (fast shutdown) or ``kill()``, ``start()`` again."""

    def __init__(
        self,
        *,
        fsync: bool = False,
        settings: dict[str, str] | None = None,
        cpu: int | None = None,
    ) -> None:
        self.bin = find_bin_dir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="router-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",  # TCP only: nothing to clean up, nothing to collide
            "fsync": "on" if fsync else "off",  # off only where a power cut cannot happen: tests
            "synchronous_commit": "on",
            "full_page_writes": "on" if fsync else "off",
            "max_connections": "50",
            "shared_buffers": "64MB",
            **(settings or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.cpu = cpu  # benchmarks pin the server to a core
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self._initdb()

    @property
    def dsn(self) -> str:
        return self.dsn_for("router")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://router@127.0.0.1:{self.port}/{database}"

    def _initdb(self) -> None:
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.data), "-U", "router", "--auth=trust",
             "--no-sync", "--encoding=UTF8", "--locale=C"],
            check=True, capture_output=True, **self._user,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> PostgresServer:
        options = [arg for key, value in self.settings.items() for arg in ("-c", f"{key}={value}")]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), *options],
                stdout=log, stderr=log, preexec_fn=self._pin, **self._user,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited {self.process.returncode}: {self.log()}")
            try:
                with psycopg.connect(self.dsn_for("postgres"), connect_timeout=2, autocommit=True):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres not ready after {timeout}s: {self.log()}"
                    ) from None
                time.sleep(0.05)
        if not self.execute("postgres", "SELECT 1 FROM pg_database WHERE datname = 'router'"):
            self.execute("postgres", "CREATE DATABASE router")
        return self

    def _pin(self) -> None:
        if self.cpu is not None and (os.cpu_count() or 1) > self.cpu:
            os.sched_setaffinity(0, {self.cpu})

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, the data is checkpointed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=timeout)

    def crash(self, timeout: float = 30.0) -> None:
        """Immediate shutdown (SIGQUIT): every backend quits at once, no checkpoint, so the next
        start runs crash recovery. (SIGKILL to the postmaster would leave its backends holding
        the shared memory, and the restart on the same directory would be refused.)"""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(timeout=timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its DSN."""
        self.execute("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.execute("postgres", f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def execute(self, database: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn_for(database), autocommit=True) as conn:
            cursor = conn.execute(query.encode(), params)  # bytes: a query built by the test
            return cursor.fetchall() if cursor.description else []
