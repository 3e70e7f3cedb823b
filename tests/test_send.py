"""`router send` as a user runs it: one event from options, a JSON file, NDJSON on stdin; counts
on stdout, each refusal with its reason on stderr, exit 1 when anything was refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.journal import Inspector
from tests.support import Daemon

pytestmark = pytest.mark.slow

CONFIG = """
[sources.app]
socket = true
raw = true
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("send"), CONFIG).start()
    yield daemon
    daemon.kill()


def router_send(daemon: Daemon, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", "send", "--config", str(daemon.config_path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def stored(daemon: Daemon) -> list[dict[str, Any]]:
    events = Inspector(daemon.data_dir / "queue.db").events_after(0, 100_000)
    return [json.loads(e.body) for e in events]


def test_one_event_from_options_with_json_property_values(daemon: Daemon) -> None:
    result = router_send(
        daemon,
        "track",
        "--user",
        "u-options",
        "--event",
        "Signed Up",
        "--prop",
        "plan=pro",
        "--prop",
        "total=12.5",
        "--prop",
        'tags=["a","b"]',
        "--prop",
        "note=not json{",
    )
    assert (result.returncode, result.stdout) == (0, "sent 1, acked 1, refused 0\n")
    [event] = [e for e in stored(daemon) if e.get("userId") == "u-options"]
    assert event["event"] == "Signed Up"
    assert event["properties"] == {
        "plan": "pro",
        "total": 12.5,
        "tags": ["a", "b"],
        "note": "not json{",
    }


def test_ndjson_on_stdin_counts_and_names_every_refusal(daemon: Daemon) -> None:
    lines = [
        '{"type":"track","userId":"u-stdin","event":"A"}',
        "not json",
        '{"type":"track","userId":"u-stdin"}',
        '{"batch":[{"type":"identify","userId":"u-stdin"},{"type":"page","userId":"u-stdin"}]}',
        '{"plain": "u-stdin"}',
    ]
    result = router_send(daemon, "-", stdin="\n".join(lines) + "\n")
    assert result.returncode == 1
    assert result.stdout == "sent 6, acked 4, refused 2\n"
    assert "stdin line 2: refused: invalid_json" in result.stderr
    assert "stdin line 3: refused: invalid_event: track event requires 'event'" in result.stderr
    mine = [e for e in stored(daemon) if "u-stdin" in (e.get("userId"), e.get("plain"))]
    assert len(mine) == 4


def test_a_pipe_without_dash_is_stdin_too(daemon: Daemon) -> None:
    result = router_send(daemon, stdin='{"type":"identify","userId":"u-pipe"}\n')
    assert (result.returncode, result.stdout) == (0, "sent 1, acked 1, refused 0\n")


def test_a_json_file_with_a_list_of_events(daemon: Daemon, tmp_path: Path) -> None:
    file = tmp_path / "events.json"
    file.write_text(json.dumps([{"type": "alias", "userId": "u-file", "previousId": "a"}] * 3))
    result = router_send(daemon, "--file", str(file))
    assert (result.returncode, result.stdout) == (0, "sent 3, acked 3, refused 0\n")
    # The three carry distinct messageIds minted by the client: all three are stored.
    assert len([e for e in stored(daemon) if e.get("userId") == "u-file"]) == 3


def test_no_daemon_exits_2_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "router", "send", "--socket", str(tmp_path / "no.sock"), "-"],
        input="{}\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unavailable: cannot connect to" in result.stderr


# -- docs/sending.md: every example is a file under docs/examples/, run here as printed -----

DOCS = Path(__file__).parent.parent / "docs"
EXAMPLES = DOCS / "examples"


@pytest.fixture
def workdir(daemon: Daemon, tmp_path: Path) -> Path:
    """A directory where ``router-data/router.sock`` is the daemon's socket, as in the docs."""
    (tmp_path / "router-data").symlink_to(daemon.data_dir)
    return tmp_path


def run_example(daemon: Daemon, command: list[str], cwd: Path) -> tuple[str, int]:
    """Run an example; its stdout and how many events it stored."""
    before = Inspector(daemon.data_dir / "queue.db").event_count()
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout, Inspector(daemon.data_dir / "queue.db").event_count() - before


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed")
    return path


def test_every_example_is_in_the_docs_as_it_is() -> None:
    text = (DOCS / "sending.md").read_text()
    for example in sorted(EXAMPLES.iterdir()):
        assert example.read_text().strip() in text, f"{example.name} differs from sending.md"


def test_the_shell_example(daemon: Daemon, workdir: Path) -> None:
    need("nc")
    need("socat")
    out, stored_now = run_example(daemon, ["sh", str(EXAMPLES / "send.sh")], workdir)
    assert out.splitlines() == [
        '{"ok":true,"count":1}',
        '{"ok":true,"count":2}',
        '{"ok":true,"count":1}',
    ]
    assert stored_now == 4


def test_the_python_example(daemon: Daemon, workdir: Path) -> None:
    out, stored_now = run_example(daemon, [sys.executable, str(EXAMPLES / "send.py")], workdir)
    assert out.splitlines() == [
        "refused: invalid_event: track event requires 'event'",
        "sent 1002, acked 1001, refused 1",
    ]
    assert stored_now == 1001


def test_the_node_example(daemon: Daemon, workdir: Path) -> None:
    node = need("node")
    out, stored_now = run_example(daemon, [node, str(EXAMPLES / "send.mjs")], workdir)
    assert out == "sent 100, acked 100, refused 0\n"
    assert stored_now == 100


def test_the_c_example(daemon: Daemon, workdir: Path) -> None:
    gcc = need("gcc")
    binary = workdir / "send"
    subprocess.run(
        [gcc, "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(binary), str(EXAMPLES / "send.c")],
        check=True,
        timeout=60,
    )
    out, stored_now = run_example(daemon, [str(binary)], workdir)
    assert out == "sent 100, acked 100, refused 0\n"
    assert stored_now == 100
