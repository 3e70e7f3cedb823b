"""router.config: TOML -> Config, and every mistake reported at its file:line and key path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.config import (
    Config,
    DestinationConfig,
    FilterConfig,
    HttpConfig,
    PrivacyConfig,
    QueueConfig,
    RouteConfig,
    SampleConfig,
    Secret,
    ServerConfig,
    SourceConfig,
    TransformConfig,
    config_error,
    default_config,
    load_config,
    parse_config,
)
from router.errors import ConfigError
from router.keypaths import KeyLocator
from router.retry import RetryPolicy

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "config" / "router.toml"


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text).lstrip("\n"))


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


HOOK = """
    [destinations.hook]
    type = "webhook"
"""

# (TOML, the whole error message). The TOML is dedented and its first line is line 1.
ERRORS = [
    pytest.param(
        """
        [server]
        http = "127.0.0.1:8088"
        data_dir =
        """,
        "router.toml:3: invalid TOML: invalid value",
        id="toml-syntax",
    ),
    pytest.param(
        """
        [server]
        [rotues]
        to = ["x"]
        """,
        "router.toml:2: rotues: unknown section (did you mean 'routes'?)",
        id="unknown-section",
    ),
    pytest.param(
        """
        [server]
        data_dir = "/var/lib/router"
        htp = "0.0.0.0:80"
        """,
        "router.toml:3: server.htp: unknown key (did you mean 'http'?)",
        id="unknown-key",
    ),
    pytest.param(
        """
        [queue]
        colour = "blue"
        """,
        "router.toml:2: queue.colour: unknown key",
        id="unknown-key-no-hint",
    ),
    pytest.param(
        """
        [sources.web]
        writekey = "k"
        """,
        "router.toml:2: sources.web.writekey: unknown key (did you mean 'write_key'?)",
        id="unknown-source-key",
    ),
    pytest.param(
        HOOK + 'retry = { max_attempt = 3, initial = "1s" }\n',
        "router.toml:3: destinations.hook.retry.max_attempt: unknown key"
        " (did you mean 'max_attempts'?)",
        id="unknown-retry-key-inline",
    ),
    pytest.param(
        """
        [server]
        http = 8088
        """,
        "router.toml:2: server.http: expected string, got integer",
        id="wrong-type",
    ),
    pytest.param(
        HOOK + 'batch_size = "10"\n',
        "router.toml:3: destinations.hook.batch_size: expected integer, got string",
        id="wrong-type-destination",
    ),
    pytest.param(
        HOOK
        + """
        [destinations.hook.retry]
        initial = "2s"
        max_attempts = "many"
        """,
        "router.toml:6: destinations.hook.retry.max_attempts: expected integer, got string",
        id="wrong-type-retry-table",
    ),
    pytest.param(
        """
        [sources.web]
        raw = "yes"
        """,
        "router.toml:2: sources.web.raw: expected boolean, got string",
        id="wrong-type-source",
    ),
    pytest.param(
        """
        [sources]
        web = "wk_123"
        """,
        "router.toml:2: sources.web: expected a table, got string",
        id="source-not-a-table",
    ),
    pytest.param(
        HOOK
        + """
        [[routes]]
        to = ["hook", 7]
        """,
        "router.toml:5: routes[0].to[1]: expected string, got integer",
        id="wrong-type-route-list-item",
    ),
    pytest.param(
        """
        [routes]
        to = ["x"]
        """,
        "router.toml:1: routes: expected an array of tables, written [[routes]]",
        id="routes-not-an-array",
    ),
    pytest.param(
        """
        [server]
        plugin_dirs = "plugins"
        """,
        "router.toml:2: server.plugin_dirs: expected array, got string",
        id="wrong-type-path-list",
    ),
    pytest.param(
        HOOK + 'timeout = "10"\n',
        "router.toml:3: destinations.hook.timeout: invalid duration '10': expected a number"
        " and a unit, like '200ms', '10s', '5m', '24h' or '7d'",
        id="bad-duration",
    ),
    pytest.param(
        HOOK + "batch_wait = 200\n",
        "router.toml:3: destinations.hook.batch_wait: expected a duration like '10s', got integer",
        id="duration-not-a-string",
    ),
    pytest.param(
        HOOK + 'retry = { max_age = "one day" }\n',
        "router.toml:3: destinations.hook.retry.max_age: invalid duration 'one day':"
        " expected a number and a unit, like '200ms', '10s', '5m', '24h' or '7d'",
        id="bad-duration-in-retry",
    ),
    pytest.param(
        """
        [queue]
        retention = "7d"
        max_bytes = "10 gigs"
        """,
        "router.toml:3: queue.max_bytes: invalid size '10 gigs': expected a number and a"
        " unit, like '512KiB', '100MB' or '10GiB'",
        id="bad-size",
    ),
    pytest.param(
        """
        [queue]
        synchronous = "fast"
        """,
        "router.toml:2: queue.synchronous: expected 'full' or 'normal'",
        id="bad-synchronous",
    ),
    pytest.param(
        """
        [server]
        socket_mode = "0999"
        """,
        "router.toml:2: server.socket_mode: invalid mode '0999': expected an octal mode"
        " like '0660'",
        id="bad-socket-mode",
    ),
    pytest.param(
        HOOK + "batch_size = 0\n",
        "router.toml:3: destinations.hook.batch_size: expected integer >= 1",
        id="batch-size-too-small",
    ),
    pytest.param(
        HOOK + "batch_size = 10001\n",
        "router.toml:3: destinations.hook.batch_size: expected integer <= 10000",
        id="batch-size-too-big",
    ),
    pytest.param(
        HOOK + "concurrency = 257\n",
        "router.toml:3: destinations.hook.concurrency: expected integer <= 256",
        id="concurrency-too-big",
    ),
    pytest.param(
        HOOK + "concurrency = 0\n",
        "router.toml:3: destinations.hook.concurrency: expected integer >= 1",
        id="concurrency-too-small",
    ),
    pytest.param(
        """
        [destinations.hook]
        url = "https://example.com"
        """,
        "router.toml:1: destinations.hook: missing required key 'type'",
        id="destination-without-type",
    ),
    pytest.param(
        """
        [destinations.hook]
        type = ""
        """,
        "router.toml:2: destinations.hook.type: must not be empty",
        id="destination-empty-type",
    ),
    pytest.param(
        """
        [destinations.a]
        type = "stdout"
        [destinations.b]
        type = "stdout"

        [[routes]]
        to = ["a"]

        [[routes]]
        to = ["b"]

        [[routes]]
        from = ["socket"]
        to = ["a", "nosuch"]
        """,
        "router.toml:14: routes[2].to: unknown destination 'nosuch'",
        id="route-unknown-destination",
    ),
    pytest.param(
        HOOK
        + """
        [[routes]]
        to = ["hoook"]
        """,
        "router.toml:5: routes[0].to: unknown destination 'hoook' (did you mean 'hook'?)",
        id="route-unknown-destination-hint",
    ),
    pytest.param(
        HOOK
        + """
        [sources.web]
        [[routes]]
        from = ["web", "mobile"]
        to = ["hook"]
        """,
        "router.toml:6: routes[0].from: unknown source 'mobile'",
        id="route-unknown-source",
    ),
    pytest.param(
        HOOK
        + """
        [[routes]]
        when = "type = 'track'"
        to = []
        """,
        "router.toml:6: routes[0].to: is empty: a route needs a destination",
        id="route-empty-to",
    ),
    pytest.param(
        HOOK
        + """
        [[routes]]
        from = []
        to = ["hook"]
        """,
        "router.toml:5: routes[0].from: is empty: omit 'from' to take every source",
        id="route-empty-from",
    ),
    pytest.param(
        """
        [[routes]]
        when = "type = 'track'"
        """,
        "router.toml:1: routes[0]: missing required key 'to'",
        id="route-without-to",
    ),
    pytest.param(
        """
        [sources.a]
        socket = true

        [sources.b]
        socket = true
        """,
        "router.toml:5: sources.b.socket: only one source can take the socket; 'a' already does",
        id="two-socket-sources",
    ),
    pytest.param(
        """
        [sources.socket]
        raw = true
        """,
        "router.toml:1: sources.socket: the socket's source: set socket = true or rename it",
        id="source-named-socket-without-socket",
    ),
    pytest.param(
        """
        [sources.web]
        write_key = "wk_1"
        [sources.ios]
        write_key = "wk_1"
        """,
        "router.toml:4: sources.ios.write_key: write key already used by source 'web'",
        id="duplicate-write-key",
    ),
    pytest.param(
        """
        [sources.web]
        write_key = "env:ROUTER_TEST_UNSET"
        """,
        "router.toml:2: sources.web.write_key: environment variable 'ROUTER_TEST_UNSET' is not set",
        id="missing-env-write-key",
    ),
    pytest.param(
        HOOK + 'secret = "env:ROUTER_TEST_UNSET"\n',
        "router.toml:3: destinations.hook.secret: environment variable 'ROUTER_TEST_UNSET'"
        " is not set",
        id="missing-env-destination-secret",
    ),
    pytest.param(
        HOOK + 'headers = { Authorization = "env:ROUTER_TEST_UNSET" }\n',
        "router.toml:3: destinations.hook.headers.Authorization: environment variable"
        " 'ROUTER_TEST_UNSET' is not set",
        id="missing-env-header",
    ),
    pytest.param(
        """
        [server]
        http = "localhost"
        """,
        "router.toml:2: server.http: invalid address 'localhost': expected 'host:port'"
        " or '[::1]:port'",
        id="http-without-port",
    ),
    pytest.param(
        """
        [server]
        http = "127.0.0.1:99999"
        """,
        "router.toml:2: server.http: invalid address '127.0.0.1:99999': expected"
        " 'host:port' or '[::1]:port'",
        id="http-port-out-of-range",
    ),
    pytest.param(
        """
        [server]
        http = "::1:8088"
        """,
        "router.toml:2: server.http: invalid address '::1:8088': expected 'host:port'"
        " or '[::1]:port'",
        id="http-v6-without-brackets",
    ),
    pytest.param(
        """
        [http]
        trusted_proxies = ["10.0.0.0/8", "proxy.local"]
        """,
        "router.toml:2: http.trusted_proxies[1]: 'proxy.local' does not appear to be an IPv4"
        " or IPv6 network",
        id="trusted-proxy-not-an-address",
    ),
    pytest.param(
        """
        [http]
        max_event_bytes = 32768
        """,
        "router.toml:2: http.max_event_bytes: expected a size like '32KiB', got integer",
        id="size-without-unit",
    ),
    pytest.param(
        """
        [http]
        strict = true
        """,
        "router.toml:2: http.strict: unknown key (did you mean 'strict_auth'?)",
        id="http-unknown-key",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_name_file_line_and_key(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ROUTER_TEST_UNSET", raising=False)
    assert error_of(text) == message


def test_error_carries_its_parts() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[server]\nhtp = 1\n", file="/etc/router/router.toml")
    err = info.value
    assert (err.file, err.line, err.key) == ("/etc/router/router.toml", 2, "server.htp")
    assert str(err).startswith("/etc/router/router.toml:2: server.htp: unknown key")


def test_toml_error_at_end_of_document() -> None:
    assert error_of('[server]\nhttp = "127.0.0.1\n') == (
        "router.toml:2: invalid TOML: illegal character '\\n'"
    )


def test_unreadable_secret_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info:
        parse_config(f'[sources.web]\nwrite_key = "file:{missing}"\n')
    assert str(info.value) == (
        f"router.toml:2: sources.web.write_key: cannot read secret file '{missing}':"
        " No such file or directory"
    )


def test_duplicate_write_key_after_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_KEY", "wk_same")
    text = '[sources.web]\nwrite_key = "env:WEB_KEY"\n[sources.ios]\nwrite_key = "wk_same"\n'
    with pytest.raises(ConfigError, match=r"^router.toml:4: sources.ios.write_key: write key"):
        parse_config(text)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read config: No such file or directory"


def test_load_config_reports_the_path_given(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text("[server]\nhttp = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:2: server.http: expected string, got integer"


# --- what a valid config turns into ----------------------------------------------------


def test_empty_config_is_all_defaults(tmp_path: Path) -> None:
    config = parse_config("", base_dir=tmp_path)
    assert config.server == ServerConfig(data_dir=tmp_path / "router-data")
    assert config.server.http_address == ("127.0.0.1", 8088)
    assert config.server.socket_path == tmp_path / "router-data" / "router.sock"
    assert config.server.socket_mode == 0o660
    assert config.server.shutdown_grace == 10.0
    assert config.queue == QueueConfig()
    assert (config.queue.retention, config.queue.max_bytes) == (7 * 86400.0, 10 * 1024**3)
    assert config.queue.dedupe_window == 86400.0
    assert config.queue.synchronous == "full"
    assert config.destinations == {}
    assert config.routes == ()
    # The socket is on, so it gets a source even though none is configured.
    assert config.sources == {"socket": SourceConfig(name="socket", socket=True, raw=False)}
    assert config.socket_source == "socket"


def test_default_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = default_config()
    assert config.server.http_address == ("127.0.0.1", 8088)
    assert config.server.data_dir == tmp_path / "router-data"
    assert config.server.socket_path == tmp_path / "router-data" / "router.sock"
    assert config.sources == {
        "local": SourceConfig(name="local", socket=True, raw=True),
        "dev": SourceConfig(name="dev", write_key=Secret("dev")),
    }
    assert config.socket_source == "local"
    assert list(config.destinations) == ["stdout"]
    assert config.destinations["stdout"].type == "stdout"
    assert [(r.sources, r.when, r.to) for r in config.routes] == [(None, None, ("stdout",))]


def test_reference_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_HOOK_SECRET", "whsec_abc")
    monkeypatch.setenv("PII_SALT", "pepper")
    config = load_config(REFERENCE)
    assert config.server.data_dir == REFERENCE.parent / "router-data"
    assert set(config.sources) == {"web", "local"}
    assert config.socket_source == "local"
    assert config.sources["web"].write_key == Secret("wk_web_123")
    hook = config.destinations["orders_hook"]
    assert hook.type == "webhook"
    assert hook.options["secret"].reveal() == "whsec_abc"
    assert hook.options["url"] == "https://hooks.example.com/orders"
    assert hook.retry == RetryPolicy()  # the file claims it shows the defaults
    assert [f.actions for f in hook.filters] == [
        ["drop"],
        ["sample"],
        ["drop_properties"],
        ["allow_properties"],
    ]
    assert hook.privacy.salt == Secret("pepper")
    assert config.routes[0].when == "type = 'track' and event = 'Order Completed'"
    assert config.destinations["archive"].options == {"path": "archive/{source}/{date}.jsonl"}
    assert config.destinations["console"].type == "stdout"
    assert [(r.sources, r.to) for r in config.routes] == [
        (("web",), ("orders_hook", "archive")),
        (("local",), ("console",)),
    ]


@pytest.mark.parametrize(
    "struct",
    [
        ServerConfig,
        FilterConfig,
        SampleConfig,
        TransformConfig,
        PrivacyConfig,
        HttpConfig,
        QueueConfig,
        SourceConfig,
        DestinationConfig,
        RouteConfig,
        RetryPolicy,
    ],
)
def test_reference_config_shows_every_key(struct: type[msgspec.Struct]) -> None:
    text = REFERENCE.read_text()
    # filters, transform and privacy are tables of their own; their keys are checked below.
    not_keys = {"name", "line", "options", "filters", "transform", "privacy"}
    for field in msgspec.structs.fields(struct):
        if field.encode_name not in not_keys:
            assert f"{field.encode_name} =" in text, field.encode_name


def test_reference_config_defaults_match_the_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Uncommenting the commented-out defaults of [server] and [queue] changes nothing (but
    the admin token, which has no default and is shown as an example)."""
    monkeypatch.setenv("ROUTER_ADMIN_TOKEN", "t0ken")
    lines = REFERENCE.read_text().splitlines()
    start = lines.index("[server]")
    end = lines.index("[sources.web]")
    uncommented = [
        line[2:] if line.startswith("# ") and " = " in line.split("#")[1] else line
        for line in lines[start:end]
    ]
    config = parse_config("\n".join(uncommented), base_dir=tmp_path)
    assert config.server.admin_token == Secret("t0ken")
    unset = msgspec.structs.replace(config.server, admin_token=None)
    assert unset == parse_config("", base_dir=tmp_path).server
    assert config.http == HttpConfig()
    assert config.queue == QueueConfig()


@pytest.mark.parametrize(
    ("section", "key", "text", "field", "value"),
    [
        ("queue", "retention", '"2w"', "retention", 14 * 86400.0),
        ("http", "max_request_bytes", '"4MiB"', "max_request_bytes", 4 * 1024**2),
        ("http", "max_event_bytes", '"64KB"', "max_event_bytes", 64_000),
        ("queue", "dedupe_window", '"90m"', "dedupe_window", 5400.0),
        ("queue", "max_bytes", '"512KiB"', "max_bytes", 512 * 1024),
        ("queue", "max_bytes", '"1GB"', "max_bytes", 10**9),
        ("server", "shutdown_grace", '"1.5s"', "shutdown_grace", 1.5),
        ("server", "socket_mode", '"0600"', "socket_mode", 0o600),
        ("server", "socket_mode", '"0o640"', "socket_mode", 0o640),
        ("server", "socket_mode", "432", "socket_mode", 0o660),
    ],
)
def test_units(section: str, key: str, text: str, field: str, value: object) -> None:
    config = parse_config(f"[{section}]\n{key} = {text}\n")
    assert getattr(getattr(config, section), field) == value


def test_destination_fields_and_options() -> None:
    config = parse(
        """
        [destinations.hook]
        type = "webhook"
        url = "https://example.com/hook"
        batch_size = 100
        batch_wait = "50ms"
        concurrency = 4
        timeout = "30s"
        order_by = "userId"
        retry = { max_attempts = 5, max_age = "1h", initial = "500ms", max_backoff = "1m" }
        """
    )
    hook = config.destinations["hook"]
    assert (hook.name, hook.type, hook.line) == ("hook", "webhook", 1)
    assert (hook.batch_size, hook.batch_wait, hook.concurrency, hook.timeout) == (
        100,
        0.05,
        4,
        30.0,
    )
    assert hook.retry == RetryPolicy(max_attempts=5, max_age=3600.0, initial=0.5, max_backoff=60)
    assert hook.options == {"url": "https://example.com/hook", "order_by": "userId"}


def test_retry_as_its_own_table() -> None:
    config = parse(
        HOOK
        + """
        [destinations.hook.retry]
        max_retry_after = "5m"
        """
    )
    assert config.destinations["hook"].retry == RetryPolicy(max_retry_after=300.0)


def test_routes() -> None:
    config = parse(
        HOOK
        + """
        [sources.web]

        [[routes]]
        to = "hook"

        [[routes]]
        from = "web"
        to = ["hook"]
        """
    )
    assert config.routes == (
        RouteConfig(sources=None, when=None, to=("hook",), line=6),
        RouteConfig(sources=("web",), when=None, to=("hook",), line=9),
    )


def test_a_route_condition_is_checked_and_located() -> None:
    config = parse(HOOK + '\n[[routes]]\nto = "hook"\nwhen = "event = \'Signed Up\'"\n')
    assert config.routes[0].when == "event = 'Signed Up'"
    with pytest.raises(ConfigError) as error:
        parse(HOOK + '\n[[routes]]\nto = "hook"\nwhen = "event = "\n')
    message = "router.toml:6: routes[0].when: invalid filter: column 9: expected a value after '='"
    assert str(error.value) == message


def test_route_may_name_the_implicit_socket_source() -> None:
    config = parse(
        HOOK
        + """
        [[routes]]
        from = ["socket"]
        to = ["hook"]
        """
    )
    assert config.routes[0].sources == ("socket",)


def test_disabled_socket_and_http(tmp_path: Path) -> None:
    config = parse_config('[server]\nsocket = ""\nhttp = ""\n', base_dir=tmp_path)
    assert config.server.socket_path is None
    assert config.server.http_address is None
    assert config.sources == {}
    assert config.socket_source is None


@pytest.mark.parametrize(
    ("http", "address"),
    [
        ("127.0.0.1:8088", ("127.0.0.1", 8088)),
        ("[::1]:8088", ("::1", 8088)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_http_address(http: str, address: tuple[str, int]) -> None:
    assert parse_config(f'[server]\nhttp = "{http}"\n').server.http_address == address


def test_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "router.toml"
    path.write_text(
        '[server]\ndata_dir = "data"\nsocket = "/run/router.sock"\n'
        'plugin_dirs = ["plugins", "/opt/plugins"]\n'
    )
    server = load_config(path).server
    assert server.data_dir == tmp_path / "etc" / "data"
    assert server.plugin_dirs == (tmp_path / "etc" / "plugins", Path("/opt/plugins"))
    assert server.socket_path == Path("/run/router.sock")


# --- secrets ----------------------------------------------------------------------------


def test_secret_hides_itself() -> None:
    secret = Secret("hunter2")
    assert secret.reveal() == "hunter2"
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret}"
    assert secret == Secret("hunter2")
    assert secret != Secret("hunter3")


def test_secrets_from_env_and_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEB_KEY", "wk_from_env")
    monkeypatch.setenv("HOOK_AUTH", "Bearer t0k")
    monkeypatch.setenv("HOOK_URL", "https://u:p@example.com/hook")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "hook").write_text("whsec_from_file\n")
    (tmp_path / "pg").write_text("postgres://u:p@db/x")
    path = tmp_path / "router.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [sources.web]
            write_key = "env:WEB_KEY"
            [sources.ios]
            write_key = "wk_literal"

            [destinations.hook]
            type = "webhook"
            url = "env:HOOK_URL"
            secret = "file:secrets/hook"
            token = "literal-token"
            headers = {{ Authorization = "env:HOOK_AUTH", X-Plain = "yes" }}
            path = "env:NOT_A_SECRET_KEY"

            [destinations.pg]
            type = "postgres"
            dsn = "file:{tmp_path / "pg"}"
            url = "https://plain.example.com"
            """
        )
    )
    config = load_config(path)
    assert config.sources["web"].write_key == Secret("wk_from_env")
    assert config.sources["ios"].write_key == Secret("wk_literal")
    hook = config.destinations["hook"].options
    assert hook["url"] == Secret("https://u:p@example.com/hook")
    assert hook["secret"] == Secret("whsec_from_file")  # trailing newline stripped
    assert hook["token"] == Secret("literal-token")  # secret-named keys are always Secrets
    assert hook["headers"] == {"Authorization": Secret("Bearer t0k"), "X-Plain": "yes"}
    assert hook["path"] == "env:NOT_A_SECRET_KEY"  # only the documented keys are resolved
    pg = config.destinations["pg"].options
    assert pg["dsn"] == Secret("postgres://u:p@db/x")
    assert pg["url"] == "https://plain.example.com"
    assert "whsec_from_file" not in repr(config)
    assert "wk_from_env" not in repr(config)


def test_empty_secret_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPTY_KEY", "")
    with pytest.raises(ConfigError) as info:
        parse_config('[sources.web]\nwrite_key = "env:EMPTY_KEY"\n')
    assert (
        str(info.value) == "router.toml:2: sources.web.write_key: secret 'env:EMPTY_KEY' is empty"
    )


# --- locating keys ------------------------------------------------------------------------


def test_config_error_for_destination_options() -> None:
    config = parse(
        """
        [server]
        http = "127.0.0.1:8088"

        [destinations.archive]
        type = "file"
        path = "/nope/{x}"
        retry = { max_attempts = 3 }
        """
    )
    err = config_error(config, "destinations.archive.path", "unknown placeholder '{x}'")
    assert str(err) == "router.toml:6: destinations.archive.path: unknown placeholder '{x}'"
    # Keys inside an inline table, or never written, fall back to the enclosing key or table.
    assert config_error(config, "destinations.archive.retry.max_attempts", "m").line == 7
    assert config_error(config.locator, "destinations.archive.compress", "m").line == 4
    assert config_error(config, "nowhere.at.all", "m").line is None


def test_locator_follows_toml_structure() -> None:
    text = textwrap.dedent(
        '''
        title = "x"
        [a]
        b.c = 1
        "quoted key" = 2
        'lit.key' = 3
        s = """
        [not_a_table]
        fake = 1
        """
        arr = [
          "[also not]",
          { x = 1 },
        ]
        after = 4  # a comment with [a bracket and "quotes
        [[t]]
        k = 1
        [t.sub]
        v = 2
        [[t]]
        k = 2
        [[t.items]]
        i = 1
        [[t.items]]
        i = 2
        [ "spaced header" . inner ]
        z = '"[x]'
        esc = "a \\" [b] = c"
        next = 5
        [x.y]
        w = 1
        [x]
        v = 1
        '''
    ).lstrip("\n")
    tomllib.loads(text)  # the fixture itself must be valid TOML
    locator = KeyLocator(text)
    expected = {
        "title": 1,
        "a": 2,
        "a.b": 3,
        "a.b.c": 3,
        'a."quoted key"': 4,
        'a."lit.key"': 5,
        "a.s": 6,
        "a.arr": 10,
        "a.arr[1].x": 10,
        "a.after": 14,
        "not_a_table": None,
        "t": 15,
        "t[0]": 15,
        "t[0].k": 16,
        "t[0].sub": 17,
        "t[0].sub.v": 18,
        "t[1]": 19,
        "t[1].k": 20,
        "t[1].items[0].i": 22,
        "t[1].items[1]": 23,
        "t[1].items[1].i": 24,
        '"spaced header".inner.z': 26,
        '"spaced header".inner.esc': 27,
        '"spaced header".inner.next': 28,
        "x.y": 29,
        "x.y.w": 30,
        "x": 31,  # the explicit header, not the first implicit mention
        "x.v": 32,
    }
    assert {path: locator.line_of(path) for path in expected} == expected


# Values that span lines or hold TOML-looking text.
DECOYS = [
    "1",
    '2  # a comment, [unclosed "',
    '"a = 1 # [x]"',
    "'[[t]]'",
    '{ k = "v", n = [1, 2] }',
    "'''\n[fake]\nk = 1\n'''",
    '"""\nq = \\"""\n[fake.table]\n"""',
    "[\n  1,\n  [2, 3],\n  '] = x',\n]",
]
bare = st.from_regex(r"[a-z_][a-z0-9_-]{0,6}", fullmatch=True)
quoted = st.text(alphabet="ab .=#[]'-", min_size=1, max_size=6)
names = st.one_of(bare, quoted)


def render_key(name: str) -> str:
    return name if name.replace("_", "a").replace("-", "a").isalnum() else json.dumps(name)


def key_path(prefix: str, name: str) -> str:
    part = render_key(name)
    return f"{prefix}.{part}" if prefix else part


@given(
    tables=st.lists(
        st.tuples(
            names,
            st.booleans(),  # an array of tables?
            st.lists(
                st.lists(st.tuples(names, st.sampled_from(DECOYS)), unique_by=lambda kv: kv[0]),
                min_size=1,
                max_size=3,
            ),
        ),
        unique_by=lambda t: t[0],
        max_size=5,
    ),
    padding=st.lists(st.sampled_from(["", "# [comment] = 1", "   "]), max_size=3),
)
def test_locator_finds_generated_keys(
    tables: list[tuple[str, bool, list[list[tuple[str, str]]]]],
    padding: list[str],
) -> None:
    lines: list[str] = []
    expected: dict[str, int] = {}
    for name, is_array, entries in tables:
        for index, entry in enumerate(entries if is_array else entries[:1]):
            lines.extend(padding)
            lines.append(f"[[{render_key(name)}]]" if is_array else f"[{render_key(name)}]")
            table = key_path("", name) + (f"[{index}]" if is_array else "")
            expected[table] = len(lines)
            for key, value in entry:
                lines.extend(padding)
                first, *rest = value.split("\n")
                lines.append(f"{render_key(key)} = {first}")
                expected[key_path(table, key)] = len(lines)
                lines.extend(rest)
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    locator = KeyLocator(text)
    assert {path: locator.line_of(path) for path in expected} == expected


def test_config_module_stays_pure() -> None:
    code = (
        "import sys, router.config; "
        "bad = {'trio', 'httpx', 'sqlite3', 'apsw', 'typer'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
