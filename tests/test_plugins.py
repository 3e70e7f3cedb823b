"""Destination discovery: built-ins, plugin files, and the worked example in plugins/."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from router.destinations import build, discover
from router.destinations.base import BuildContext, Delivery
from router.errors import ConfigError

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def context(tmp_path: Path, type_: str, **options: object) -> BuildContext:
    return BuildContext(
        name="out",
        type=type_,
        options=dict(options),
        data_dir=tmp_path,
        timeout=5.0,
        batch_size=10,
        file="router.toml",
        line=7,
    )


async def test_the_csv_example_writes_rows(tmp_path: Path):
    types = discover([PLUGINS])
    columns = ["messageId", "event", "properties.total", "context.missing"]
    destination = build(context(tmp_path, "csv", path="out/orders.csv", columns=columns), types)
    batch = [
        Delivery(
            1, "app", "m1", 0.0, b'{"messageId":"m1","event":"Paid","properties":{"total":3}}', 1
        ),
        Delivery(2, "app", "m2", 0.0, b'{"messageId":"m2","event":"Left, angry"}', 1),
    ]
    assert await destination.send(batch) is None
    with (tmp_path / "out" / "orders.csv").open(newline="") as written:
        rows = list(csv.reader(written))
    assert rows == [columns, ["m1", "Paid", "3", ""], ["m2", "Left, angry", "", ""]]


def test_bad_plugin_options_point_at_the_destination(tmp_path: Path):
    types = discover([PLUGINS])
    with pytest.raises(ConfigError) as error:
        build(context(tmp_path, "csv", path="x.csv", columns="messageId"), types)
    assert str(error.value).startswith("router.toml:7: destinations.out.columns: Expected `array`")


def test_an_unknown_type_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(
        ConfigError, match=r"router.toml:7: destinations.out.type: unknown .*'nosuch'.*webhook"
    ):
        build(context(tmp_path, "nosuch"), discover())


def test_a_plugin_file_that_fails_to_import_is_named(tmp_path: Path):
    (tmp_path / "broken.py").write_text("import does_not_exist\n")
    with pytest.raises(ConfigError, match=r"broken.py failed to import"):
        discover([tmp_path])


def test_a_plugin_cannot_shadow_a_built_in(tmp_path: Path):
    (tmp_path / "shadow.py").write_text("DESTINATIONS = {'webhook': object}\n")
    with pytest.raises(ConfigError, match="already defined"):
        discover([tmp_path])
