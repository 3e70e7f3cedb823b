"""TOML configuration -> typed, validated ``Config``, with every error located by file:line.

Owns: the config schema (msgspec Structs), units and secret resolution (``env:NAME``,
``file:/path``), cross-references (routes name real sources and destinations), and errors
located by ``router.keypaths.KeyLocator`` (tomllib gives no positions). Must not: open sockets
or databases, import trio, or judge destination *types* and their options (the destination
registry does, via ``config_error``). Reading the config file, secret files and the
environment is the only I/O here.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from router import fql
from router.errors import ConfigError
from router.keypaths import KeyLocator, join_key
from router.nats_wire import parse_urls
from router.retry import RetryPolicy
from router.units import parse_duration, parse_size

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Secret:
    """A string that never shows itself in logs, reprs or tracebacks; ``reveal()`` to use it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def reveal(value: str | Secret) -> str:
    """The plain text of an option that may or may not have been a secret reference."""
    return value.reveal() if isinstance(value, Secret) else value


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path = Path("router-data")
    http: str = "127.0.0.1:8088"
    socket: str = "router.sock"
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o7777)] = 0o660
    shutdown_grace: float = 10.0
    plugin_dirs: tuple[Path, ...] = ()
    # The admin API over HTTP (POST /admin), with this bearer token; unset: only the admin
    # socket in data_dir (mode 0600) serves it.
    admin_token: Secret | None = None

    @property
    def admin_socket_path(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def socket_path(self) -> Path | None:
        return self.data_dir / self.socket if self.socket else None

    @property
    def http_address(self) -> tuple[str, int] | None:
        return parse_address(self.http) if self.http else None


class HttpConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The Segment-compatible HTTP API. Limits default to Segment's own."""

    # Unknown or missing write key: 401 when strict; otherwise Segment's answer (200, dropped,
    # counted), so clients configured with a stale key do not retry forever.
    strict_auth: bool = False
    max_event_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024
    max_request_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 500 * 1024
    max_batch_events: Annotated[int, msgspec.Meta(ge=1)] = 2500
    # Open connections served at once; beyond it a connection is answered 503 and closed.
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1024
    # Peers whose X-Forwarded-For is believed when filling context.ip (addresses or CIDRs).
    trusted_proxies: tuple[str, ...] = ()
    # Origins browsers may post from; "*" allows any.
    cors_origins: tuple[str, ...] = ("*",)

    @property
    def trusted_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)


class QueueConfig(msgspec.Struct, frozen=True, kw_only=True):
    synchronous: Literal["full", "normal"] = "full"
    retention: float = 7 * 86400.0
    max_bytes: int = 10 * 1024**3
    dedupe_window: float = 24 * 3600.0


class NatsSourceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A durable JetStream pull consumer feeding a source (a hub taking what edges published)."""

    url: Secret  # nats://[user:password@]host:port; may hold credentials, so never logged
    consumer: str  # the durable consumer's name: one per hub (hubs sharing it share the work)
    stream: str = "EVENTS"
    subject: str = ""  # the consumer's filter; "" takes the whole stream
    batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500  # messages per pull and commit
    ack_wait: float = 30.0  # unacked this long (say, the hub died): the server redelivers


class SourceConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    write_key: Secret | None = None
    socket: bool = False
    raw: bool = False  # accept plain JSON objects that are not Segment calls
    plan: Path | None = None  # a tracking plan (JSON), relative to the config file
    nats: NatsSourceConfig | None = None


class SampleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    percent: Annotated[float, msgspec.Meta(ge=0, le=100)]
    by: str = "messageId"  # the path whose value decides, so a user is kept or not as a whole


class FilterConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One destination filter (Segment's): a condition and one action."""

    condition: str | None = msgspec.field(default=None, name="if")  # FQL; None: every event
    drop: bool = False
    sample: SampleConfig | None = None
    drop_properties: tuple[str, ...] = ()
    allow_properties: tuple[str, ...] = ()
    line: int = 0

    @property
    def actions(self) -> list[str]:
        named = {
            "drop": self.drop,
            "sample": self.sample is not None,
            "drop_properties": bool(self.drop_properties),
            "allow_properties": bool(self.allow_properties),
        }
        return [name for name, present in named.items() if present]


class TransformConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Field edits at delivery, then an optional Python function (like Segment Functions)."""

    set: dict[str, Any] = {}  # dotted path -> value
    rename: dict[str, str] = {}  # dotted path -> dotted path
    remove: tuple[str, ...] = ()
    function: str | None = None  # a name from TRANSFORMS in plugin_dirs or router.transforms


class PrivacyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """PII controls, applied last so nothing before them can put a field back."""

    drop: tuple[str, ...] = ()  # dotted paths, or globs over them ("*.email")
    hash: tuple[str, ...] = ()  # the same, replaced by salted SHA-256
    salt: Secret | None = None


class DestinationConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    type: str
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    batch_wait: float = 0.2
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=256)] = 1
    timeout: float = 10.0
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    filters: tuple[FilterConfig, ...] = ()
    transform: TransformConfig = msgspec.field(default_factory=TransformConfig)
    privacy: PrivacyConfig = msgspec.field(default_factory=PrivacyConfig)
    options: dict[str, Any] = {}  # every other key, for the destination plugin to judge
    line: int = 0


class RouteConfig(msgspec.Struct, frozen=True, kw_only=True):
    sources: tuple[str, ...] | None = msgspec.field(default=None, name="from")
    when: str | None = None
    to: tuple[str, ...]
    line: int = 0


class Config(msgspec.Struct, frozen=True, kw_only=True):
    file: str
    server: ServerConfig
    http: HttpConfig
    queue: QueueConfig
    sources: dict[str, SourceConfig]
    destinations: dict[str, DestinationConfig]
    routes: tuple[RouteConfig, ...]
    locator: KeyLocator

    @property
    def socket_source(self) -> str | None:
        return next((s.name for s in self.sources.values() if s.socket), None)


# Keys whose destination option values are resolved as secrets: always for these ...
_SECRET_KEYS = frozenset({"secret", "password", "token", "write_key"})
# ... and only when written as ``env:``/``file:`` references for these (and headers' values).
_REFERENCE_KEYS = frozenset({"url", "dsn"})


def _parse_mode(text: str) -> int:
    if not re.fullmatch(r"0?o?[0-7]{1,4}", text):
        raise ValueError(f"invalid mode {text!r}: expected an octal mode like '0660'")
    return int(text.replace("o", ""), 8)


_Unit = tuple[Callable[[str], float], str]
_DURATION: _Unit = (parse_duration, "a duration like '10s'")
_UNITS: dict[str, dict[str, _Unit]] = {  # TOML writes these as strings; the Structs hold numbers
    "server": {"shutdown_grace": _DURATION, "socket_mode": (_parse_mode, "a mode like '0660'")},
    "http": {
        "max_event_bytes": (parse_size, "a size like '32KiB'"),
        "max_request_bytes": (parse_size, "a size like '500KiB'"),
    },
    "queue": {
        "retention": _DURATION,
        "dedupe_window": _DURATION,
        "max_bytes": (parse_size, "a size like '10GiB'"),
    },
    "destination": {"batch_wait": _DURATION, "timeout": _DURATION},
    "retry": dict.fromkeys(("max_age", "initial", "max_backoff", "max_retry_after"), _DURATION),
    "nats": {"ack_wait": _DURATION},
}
_SECTIONS = ("server", "http", "queue", "sources", "destinations", "routes")


def load_config(path: str | Path) -> Config:
    """Read and parse the config file at ``path``; relative paths in it are relative to it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", file=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text: {exc.reason}", file=str(path)) from exc
    return parse_config(text, file=str(path), base_dir=path.absolute().parent)


def default_config() -> Config:
    """The embedded default (HTTP, the socket, everything to stdout), relative to the cwd."""
    text = resources.files("router").joinpath("default.toml").read_text("utf-8")
    return parse_config(text, file="default.toml")


def parse_config(text: str, *, file: str = "router.toml", base_dir: Path | None = None) -> Config:
    """Parse config ``text``; ``base_dir`` (default: the cwd) anchors relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r" \(at (?:line (\d+), column \d+|end of document)\)$", str(exc))
        line = int(match[1]) if match and match[1] else text.count("\n") + 1
        message = str(exc)[: match.start()] if match else str(exc)
        message = message[:1].lower() + message[1:]
        raise ConfigError(f"invalid TOML: {message}", file=file, line=line) from exc
    return _Builder(KeyLocator(text, file=file), (base_dir or Path.cwd()).absolute()).build(data)


def config_error(where: Config | KeyLocator, key_path: str, message: str) -> ConfigError:
    """A ``ConfigError`` pointing at ``key_path``'s line; for code that judges options later."""
    locator = where.locator if isinstance(where, Config) else where
    return ConfigError(message, file=locator.file, line=locator.line_of(key_path), key=key_path)


def parse_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> (host, port); port 0 means any free port."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    port = int((match.group(2) or match.group(4)) if match else -1)
    if not match or port > 65535:
        raise ValueError(f"invalid address {text!r}: expected 'host:port' or '[::1]:port'")
    return match.group(1) or match.group(3), port


_T = TypeVar("_T")


class _Builder:
    """One parse: turns the tomllib dict into a ``Config``, failing at the first located error."""

    def __init__(self, locator: KeyLocator, base_dir: Path) -> None:
        self.locator = locator
        self.base_dir = base_dir

    def error(self, key: str, message: str) -> ConfigError:
        return config_error(self.locator, key, message)

    def build(self, data: dict[str, Any]) -> Config:
        self.check_keys(data, _SECTIONS, "", what="section")
        server_table = self.units(self.table(data, "server"), "server")
        if isinstance(server_table.get("admin_token"), str):
            token = self.secret(server_table["admin_token"], "server.admin_token")
            server_table = {**server_table, "admin_token": token}
        server = self.convert(server_table, ServerConfig, "server")
        server = msgspec.structs.replace(
            server,
            data_dir=self.base_dir / server.data_dir,
            plugin_dirs=tuple(self.base_dir / p for p in server.plugin_dirs),
        )
        if server.http:
            try:
                parse_address(server.http)
            except ValueError as exc:
                raise self.error("server.http", str(exc)) from exc
        http = self.convert(self.units(self.table(data, "http"), "http"), HttpConfig, "http")
        for index, proxy in enumerate(http.trusted_proxies):
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError as exc:
                raise self.error(f"http.trusted_proxies[{index}]", str(exc)) from exc
        queue_table = self.table(data, "queue")
        if queue_table.get("synchronous", "full") not in ("full", "normal"):
            raise self.error("queue.synchronous", "expected 'full' or 'normal'")
        queue = self.convert(self.units(queue_table, "queue"), QueueConfig, "queue")
        sources = {
            name: self.source(name, self.table(data["sources"], name, "sources"))
            for name in self.table(data, "sources")
        }
        self.check_sources(sources, server)
        destinations = {
            name: self.destination(name, self.table(data["destinations"], name, "destinations"))
            for name in self.table(data, "destinations")
        }
        routes = data.get("routes", [])
        if not isinstance(routes, list) or not all(isinstance(r, dict) for r in routes):
            raise self.error("routes", "expected an array of tables, written [[routes]]")
        return Config(
            file=self.locator.file,
            server=server,
            http=http,
            queue=queue,
            sources=sources,
            destinations=destinations,
            routes=tuple(self.route(i, r, sources, destinations) for i, r in enumerate(routes)),
            locator=self.locator,
        )

    def table(self, parent: dict[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            raise self.error(join_key(prefix, key), f"expected a table, got {_toml_type(value)}")
        return value

    def check_keys(
        self, table: dict[str, Any], known: Iterable[str], prefix: str, what: str
    ) -> None:
        known = list(known)
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.error(join_key(prefix, key), f"unknown {what}{hint}")

    def convert(self, table: dict[str, Any], cls: type[_T], prefix: str, **extra: Any) -> _T:
        """``table`` as a ``cls``, plus ``extra`` fields that the TOML does not spell."""
        if issubclass(cls, msgspec.Struct):
            fields = {f.encode_name for f in msgspec.structs.fields(cls)}
            self.check_keys(table, fields - {"name", "line", "options"}, prefix, what="key")
        try:
            return msgspec.convert({**table, **extra}, cls, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            # msgspec says "Expected `int`, got `str` - at `$.retry.max_attempts`"; say it in
            # TOML's words, at the key path the user wrote.
            match = re.fullmatch(r"(.*?)(?: - at `\$(.*)`)?", str(exc))
            assert match is not None  # the pattern matches any string
            message = re.sub(
                r"Object missing required field `(.*)`",
                r"missing required key '\1'",
                match.group(1).replace(" | null", ""),
            )
            message = re.sub(r"`(\w+)`", lambda m: _TYPE_NAMES.get(m[1], m[1]), message)
            path = prefix + (match.group(2) or "")
            raise self.error(path.lstrip("."), message[:1].lower() + message[1:]) from exc

    def units(self, table: dict[str, Any], kind: str, prefix: str | None = None) -> dict[str, Any]:
        """Durations and sizes (and a string ``socket_mode``) into numbers, located on failure."""
        prefix = kind if prefix is None else prefix
        out = dict(table)
        for key, (parse, unit) in _UNITS[kind].items():
            value = out.get(key)
            if value is None or (key == "socket_mode" and type(value) is int):
                continue
            if not isinstance(value, str):
                raise self.error(join_key(prefix, key), f"expected {unit}, got {_toml_type(value)}")
            try:
                out[key] = parse(value)
            except ValueError as exc:
                raise self.error(join_key(prefix, key), str(exc)) from exc
        return out

    def secret(self, value: str, key: str) -> Secret:
        kind, _, rest = value.partition(":")
        if kind == "env":
            resolved = os.environ.get(rest)
            if resolved is None:
                raise self.error(key, f"environment variable {rest!r} is not set")
        elif kind == "file":
            path = self.base_dir / Path(rest).expanduser()
            try:
                resolved = path.read_text("utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise self.error(key, f"cannot read secret file '{path}': {reason}") from exc
        else:
            return Secret(value)
        if not resolved:
            raise self.error(key, f"secret {value!r} is empty")
        return Secret(resolved)

    def source(self, name: str, table: dict[str, Any]) -> SourceConfig:
        prefix = join_key("sources", name)
        if isinstance(table.get("write_key"), str):
            key = self.secret(table["write_key"], join_key(prefix, "write_key"))
            table = {**table, "write_key": key}
        if "nats" in table:
            table = {**table, "nats": self.nats_source(self.table(table, "nats", prefix), prefix)}
        source = self.convert(table, SourceConfig, prefix, name=name)
        if source.plan is not None:
            source = msgspec.structs.replace(source, plan=self.base_dir / source.plan)
        return source

    def nats_source(self, table: dict[str, Any], source: str) -> dict[str, Any]:
        prefix = join_key(source, "nats")
        table = self.units(table, "nats", prefix)
        url = table.get("url")
        if isinstance(url, str):
            table["url"] = secret = self.secret(url, join_key(prefix, "url"))
            try:
                parse_urls(secret.reveal())
            except ValueError as exc:
                raise self.error(join_key(prefix, "url"), str(exc)) from exc
        for key in ("stream", "consumer"):
            name = table.get(key)
            if isinstance(name, str) and not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise self.error(join_key(prefix, key), "a name of letters, digits, '_' and '-'")
        subject = table.get("subject")
        if isinstance(subject, str) and re.search(r"\s|^\.|\.$|\.\.", subject):
            raise self.error(join_key(prefix, "subject"), f"not a NATS subject: {subject!r}")
        return table

    def check_sources(self, sources: dict[str, SourceConfig], server: ServerConfig) -> None:
        socket_owner: str | None = None
        key_owner: dict[str, str] = {}
        for name, source in sources.items():
            prefix = join_key("sources", name)
            if source.socket and socket_owner is not None:
                message = f"only one source can take the socket; {socket_owner!r} already does"
                raise self.error(join_key(prefix, "socket"), message)
            socket_owner = name if source.socket else socket_owner
            if source.write_key is not None:
                other = key_owner.setdefault(source.write_key.reveal(), name)
                if other != name:
                    raise self.error(
                        join_key(prefix, "write_key"), f"write key already used by source {other!r}"
                    )
        if socket_owner is None and server.socket:
            if "socket" in sources:
                raise self.error(
                    "sources.socket", "the socket's source: set socket = true or rename it"
                )
            sources["socket"] = SourceConfig(name="socket", socket=True)

    def destination(self, name: str, table: dict[str, Any]) -> DestinationConfig:
        prefix = join_key("destinations", name)
        if "type" not in table:
            raise self.error(prefix, "missing required key 'type'")
        if table["type"] == "":
            raise self.error(join_key(prefix, "type"), "must not be empty")
        known = {
            "type",
            "batch_size",
            "batch_wait",
            "concurrency",
            "timeout",
            "retry",
            "filters",
            "transform",
            "privacy",
        }
        options = {k: self.option(k, v, prefix) for k, v in table.items() if k not in known}
        fields = self.units({k: v for k, v in table.items() if k in known}, "destination", prefix)
        if "retry" in fields:
            retry = self.table(fields, "retry", prefix)
            fields["retry"] = self.units(retry, "retry", join_key(prefix, "retry"))
            self.check_keys(retry, RetryPolicy.__struct_fields__, join_key(prefix, "retry"), "key")
        privacy = fields.get("privacy")
        if isinstance(privacy, dict) and isinstance(privacy.get("salt"), str):
            salt = self.secret(privacy["salt"], join_key(prefix, "privacy.salt"))
            fields["privacy"] = {**privacy, "salt": salt}
        built = self.convert(fields, DestinationConfig, prefix, name=name)
        filters = tuple(
            self.filter(f"{prefix}.filters[{index}]", spec)
            for index, spec in enumerate(built.filters)
        )
        if built.privacy.hash and built.privacy.salt is None:
            raise self.error(
                join_key(prefix, "privacy.salt"),
                'hashing needs a salt (e.g. salt = "env:PII_SALT"): unsalted hashes of '
                "emails or phone numbers are reversed by a dictionary",
            )
        line = self.locator.line_of(prefix) or 0
        return msgspec.structs.replace(built, options=options, filters=filters, line=line)

    def filter(self, path: str, spec: FilterConfig) -> FilterConfig:
        actions = spec.actions
        if len(actions) != 1:
            found = ", ".join(actions) or "none"
            raise self.error(
                path,
                "a filter takes exactly one action of drop, sample, drop_properties, "
                f"allow_properties (found: {found})",
            )
        if spec.condition is not None:
            self.fql(f"{path}.if", spec.condition)
        return msgspec.structs.replace(spec, line=self.locator.line_of(path) or 0)

    def fql(self, key: str, text: str) -> None:
        try:
            fql.parse(text)
        except fql.FqlError as exc:
            raise self.error(key, f"invalid filter: {exc}") from exc

    def option(self, key: str, value: Any, prefix: str) -> Any:
        path = join_key(prefix, key)
        if key in _SECRET_KEYS and isinstance(value, str):
            return self.secret(value, path)
        if key in _REFERENCE_KEYS:
            return self.reference(value, path)
        if key == "headers" and isinstance(value, dict):
            return {k: self.reference(v, join_key(path, k)) for k, v in value.items()}
        return value

    def reference(self, value: Any, path: str) -> Any:
        """``value`` resolved if it is an ``env:``/``file:`` reference, else as it is."""
        is_reference = isinstance(value, str) and value.startswith(("env:", "file:"))
        return self.secret(value, path) if is_reference else value

    def route(
        self,
        index: int,
        table: dict[str, Any],
        sources: Mapping[str, SourceConfig],
        destinations: Mapping[str, DestinationConfig],
    ) -> RouteConfig:
        prefix = f"routes[{index}]"
        # A single name is as clear as a list of one; accept both.
        listed = {k: [v] for k, v in table.items() if k in ("from", "to") and isinstance(v, str)}
        table = {**table, **listed}
        route = self.convert(table, RouteConfig, prefix)
        for key, names, known, what, empty in [
            ("from", route.sources, sources, "source", "omit 'from' to take every source"),
            ("to", route.to, destinations, "destination", "a route needs a destination"),
        ]:
            if names == ():
                raise self.error(f"{prefix}.{key}", f"is empty: {empty}")
            for name in names or ():
                if name not in known:
                    close = difflib.get_close_matches(name, list(known), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise self.error(f"{prefix}.{key}", f"unknown {what} {name!r}{hint}")
        if route.when is not None:
            self.fql(f"{prefix}.when", route.when)
        return msgspec.structs.replace(route, line=self.locator.line_of(prefix) or 0)


def _dec_hook(cls: type[Any], value: Any) -> Any:
    if isinstance(value, cls):  # a Secret resolved before conversion
        return value
    if cls is Path and isinstance(value, str):
        return Path(value).expanduser()
    raise NotImplementedError


_TYPE_NAMES = {
    "str": "string",
    "Path": "string",
    "int": "integer",
    "bool": "boolean",
    "dict": "table",
    "object": "table",
    "list": "array",
}


def _toml_type(value: object) -> str:
    return _TYPE_NAMES.get(type(value).__name__, type(value).__name__)
