"""`router init` as users run it: the file it writes passes `router check` as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from router.cli_init import LOCAL, SYSTEM, is_system_path, starter_text
from router.config import parse_config

ROOT = Path(__file__).resolve().parent.parent


def router(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER")}
    return subprocess.run(
        [sys.executable, "-m", "router", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_key(text: str) -> str:
    found = re.search(r'^write_key = "([^"]+)"', text, re.MULTILINE)
    assert found is not None
    return found.group(1)


def test_init_then_check(tmp_path: Path) -> None:
    done = router("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote router.toml" in done.stdout
    checked = router("check", cwd=tmp_path)  # finds ./router.toml by itself
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "router.toml: ok (1 sources, 1 destinations, 1 routes)"
    assert not (tmp_path / "router-data").exists()  # init and check create nothing else


def test_an_existing_file_is_kept_unless_forced(tmp_path: Path) -> None:
    target = tmp_path / "conf" / "router.toml"  # the directory is made as well
    assert router("init", str(target), cwd=tmp_path).returncode == 0
    first = target.read_text()
    refused = router("init", str(target), cwd=tmp_path)
    assert refused.returncode == 2
    assert "exists; use --force" in refused.stderr
    assert target.read_text() == first
    forced = router("init", "--force", str(target), cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert write_key(target.read_text()) != write_key(first)  # a fresh key
    assert router("check", "--config", str(target), cwd=tmp_path).returncode == 0


def test_every_init_makes_up_its_own_write_key(tmp_path: Path) -> None:
    keys = set()
    for name in ("a.toml", "b.toml"):
        assert router("init", name, cwd=tmp_path).returncode == 0
        keys.add(write_key((tmp_path / name).read_text()))
    assert len(keys) == 2
    assert all(len(key) >= 20 for key in keys)


def test_the_system_layout_passes_check(tmp_path: Path) -> None:
    target = tmp_path / "router.toml"
    assert router("init", "--system", str(target), cwd=tmp_path).returncode == 0
    checked = router("check", "--config", str(target), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    config = parse_config(target.read_text(), base_dir=tmp_path)
    assert config.server.data_dir == Path("/var/lib/router")
    assert config.server.socket_path == Path("/run/router/router.sock")


@pytest.mark.parametrize("system", [False, True])
def test_the_starter_has_no_placeholder_left(system: bool) -> None:
    text = starter_text(Path("router.toml"), system=system, write_key="k" * 24)
    assert re.search(r"@\w+@", text) is None
    layout = SYSTEM if system else LOCAL
    config = parse_config(text, base_dir=Path("/srv"))
    assert config.server.data_dir == Path("/srv") / layout["data_dir"]
    assert config.sources["app"].socket


def test_a_file_under_etc_gets_the_system_layout() -> None:
    assert is_system_path(Path("/etc/router/router.toml"))
    assert not is_system_path(Path("/srv/router/router.toml"))


def test_the_starter_is_shipped_in_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "starter.toml" in pyproject["tool"]["setuptools"]["package-data"]["router"]
