"""The NATS client protocol, as far as router speaks it: bytes in, protocol events out, and the
bytes of each command we send. Pure (h11's way): no sockets, no trio, no clock.

Owns: parsing the server's stream (``INFO``, ``MSG``, ``HMSG``, ``PING``, ``PONG``, ``+OK``,
``-ERR``) from input cut anywhere, encoding ``CONNECT``/``SUB``/``PUB``/``HPUB``, the
``nats://`` URL, subject templates with their tokens made safe, and reading JetStream's
answers (PubAck, status headers, ack subjects). Must not: do I/O or decide retries.
Protocol reference: https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import itertools
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

import msgspec

CRLF = b"\r\n"
MAX_CONTROL_LINE = 4096  # the server's own limit; a longer line means we lost the framing


class ProtocolError(Exception):
    """The server's bytes do not parse: the connection must be dropped."""


@dataclass(frozen=True, slots=True)
class Info:
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    message: str


@dataclass(slots=True)  # not frozen: its __init__ is on the hot path (one per PubAck)
class Msg:
    subject: bytes
    sid: int
    reply: bytes | None
    headers: bytes  # the raw header block ("NATS/1.0 ...\r\n...\r\n\r\n"), b"" without one
    payload: bytes

    @property
    def status(self) -> int | None:
        """A status message's code (``NATS/1.0 404 No Messages`` -> 404), else None."""
        line = self.headers[: self.headers.find(CRLF)] if self.headers else b""
        parts = line.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    @property
    def description(self) -> str:
        line = self.headers[: self.headers.find(CRLF)] if self.headers else b""
        parts = line.split(b" ", 2)
        return parts[2].decode("utf-8", "replace") if len(parts) == 3 else ""

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


Event = Info | Ping | Pong | Err | Msg
_PING, _PONG = Ping(), Pong()


class Parser:
    """Feed it what the socket gave; get back every complete protocol event in order."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Event]:
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        pos = 0
        size = len(buffer)
        while pos < size:
            end = buffer.find(CRLF, pos)
            if end < 0:
                if size - pos > MAX_CONTROL_LINE:
                    raise ProtocolError("control line too long")
                break
            op = buffer[pos : pos + 4]
            if op == b"MSG " or op == b"HMSG":
                parsed = _message(buffer, pos, end)
                if parsed is None:
                    break  # the payload has not all arrived
                message, pos = parsed
                events.append(message)
                continue
            line = buffer[pos:end]
            pos = end + 2
            if line == b"PING":
                events.append(_PING)
            elif line == b"PONG":
                events.append(_PONG)
            elif line == b"+OK":
                continue
            elif line.startswith(b"INFO "):
                events.append(Info(msgspec.json.decode(line[5:])))
            elif line.startswith(b"-ERR"):
                events.append(Err(line[4:].strip().strip(b"'").decode("utf-8", "replace")))
            else:
                raise ProtocolError(f"unexpected line from the server: {line[:80]!r}")
        self._buffer = buffer[pos:]
        return events


def _message(buffer: bytes, pos: int, end: int) -> tuple[Msg, int] | None:
    """``MSG subject sid [reply] size`` or ``HMSG subject sid [reply] hsize size``, with the
    payload that follows; None while the payload is incomplete."""
    parts = buffer[pos:end].split(b" ")
    try:
        if parts[0] == b"MSG":
            header_size = 0
            total = int(parts[-1])
            reply = parts[3] if len(parts) == 5 else None
        else:
            header_size = int(parts[-2])
            total = int(parts[-1])
            reply = parts[3] if len(parts) == 6 else None
        sid = int(parts[2])
    except (ValueError, IndexError) as exc:
        raise ProtocolError(f"bad message line {buffer[pos:end][:80]!r}") from exc
    start = end + 2
    stop = start + total
    if len(buffer) < stop + 2:
        return None
    if buffer[stop : stop + 2] != CRLF:
        raise ProtocolError(f"message payload not {total} bytes: {buffer[pos:end][:80]!r}")
    body = buffer[start:stop]
    message = Msg(parts[1], sid, reply, body[:header_size], body[header_size:])
    return message, stop + 2


def header_value(block: bytes, name: str) -> str | None:
    """A header's value in a raw NATS header block; names compare case-insensitively."""
    wanted = name.lower().encode()
    for line in block.split(CRLF)[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == wanted:
            return value.strip().decode("utf-8", "replace")
    return None


# -- commands we send -----------------------------------------------------------


def connect(*, name: str, user: str = "", password: str = "", token: str = "") -> bytes:
    options: dict[str, Any] = {
        "verbose": False,  # no +OK per command: acks we need come from JetStream
        "pedantic": False,
        "headers": True,
        "no_responders": True,  # a publish no stream takes is answered 503 at once
        "protocol": 1,
        "lang": "python-trio",
        "version": "router",
        "name": name,
    }
    if user:
        options.update(user=user, **{"pass": password})
    if token:
        options["auth_token"] = token
    return b"CONNECT " + msgspec.json.encode(options) + CRLF


def sub(subject: str, sid: int) -> bytes:
    return f"SUB {subject} {sid}\r\n".encode()


def pub(subject: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    middle = b" " + reply if reply else b""
    return b"PUB %s%s %d\r\n%s\r\n" % (subject, middle, len(payload), payload)


def hpub(subject: bytes, reply: bytes, headers: bytes, payload: bytes) -> bytes:
    """``headers`` as from ``header_block``."""
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject,
        reply,
        len(headers),
        len(headers) + len(payload),
        headers,
        payload,
    )


def header_block(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"NATS/1.0\r\n" + b"".join(k + b": " + v + CRLF for k, v in pairs) + CRLF


# -- URLs and subjects -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    user: str = ""
    password: str = ""
    token: str = ""

    @property
    def where(self) -> str:
        """host:port, safe to log (no credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


URL_FORM = "nats://[user:password@|token@]host[:port], comma-separated for a cluster"


def parse_urls(text: str) -> list[Address]:
    """Every server of a comma-separated list; ValueError (which never repeats the text: it
    may hold a password) when one is not a ``nats://`` URL."""
    return [parse_url(part.strip()) for part in text.split(",")]


def parse_url(url: str) -> Address:
    """``nats://[user:password@|token@]host[:port]``; raises ValueError when it is not one."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "nats" or not parsed.hostname:
        raise ValueError(f"expected {URL_FORM} (tls:// is not supported)")
    try:
        port = parsed.port or 4222
    except ValueError as exc:
        raise ValueError(f"bad port in a nats:// URL; expected {URL_FORM}") from exc
    user = urllib.parse.unquote(parsed.username or "")
    password = urllib.parse.unquote(parsed.password or "")
    if user and parsed.password is None:  # nats://TOKEN@host
        return Address(parsed.hostname, port, token=user)
    return Address(parsed.hostname, port, user=user, password=password)


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_NAME = re.compile(r"[A-Za-z0-9_\-]+")
_FIELD = re.compile(r"\{(\w+)\}")
SUBJECT_FIELDS = ("type", "source", "event")


def safe_token(text: str) -> str:
    """One subject token from arbitrary text: NATS splits subjects on ``.``, treats ``*`` and
    ``>`` as wildcards and forbids whitespace, so anything beyond ``[A-Za-z0-9_-]`` becomes
    ``_`` (an event named "Order Completed" -> ``Order_Completed``); empty text -> ``_``."""
    return _UNSAFE.sub("_", text[:128]) or "_"


def is_name(text: str) -> bool:
    """A stream or consumer name: one safe token."""
    return bool(_NAME.fullmatch(text))


def template_fields(template: str) -> tuple[str, ...]:
    """The ``{field}`` placeholders of a subject template; ValueError for unknown ones or a
    template that could not make a valid subject."""
    fields = tuple(_FIELD.findall(template))
    for field in fields:
        if field not in SUBJECT_FIELDS:
            raise ValueError(
                f"unknown placeholder {{{field}}} (known: {', '.join(SUBJECT_FIELDS)})"
            )
    literal = _FIELD.sub("x", template)
    tokens = literal.split(".")
    if not literal or any(not t or any(c in t for c in " \t*>") for t in tokens):
        raise ValueError(f"not a publishable subject: {template!r} (no wildcards or empty tokens)")
    return fields


def render_subject(template: str, values: dict[str, str]) -> str:
    return _FIELD.sub(lambda m: safe_token(values.get(m[1], "")), template)


def stream_subjects(template: str) -> list[str]:
    """The subjects a stream router creates captures for ``template``: everything under its
    literal leading tokens (``events.{type}`` -> ``events.>``), so consumers may filter with
    ``events.>`` (the server refuses a filter that is not within the stream's subjects, and
    ``events.>`` is not within ``events.*``); a template that starts with a placeholder gets
    each placeholder as one wildcard token."""
    tokens = template.split(".")
    literal = list(itertools.takewhile(lambda token: not _FIELD.search(token), tokens))
    if not literal:
        return [_FIELD.sub("*", template)]
    if len(literal) == len(tokens):
        return [template]
    return [".".join([*literal, ">"])]


# -- JetStream answers -----------------------------------------------------------------


class PubAckError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: PubAckError | None = None


_pub_ack = msgspec.json.Decoder(PubAck).decode
STORED = PubAck()  # what a PubAck without an error comes to; shared, never changed


def pub_ack(payload: bytes) -> PubAck:
    """A JetStream publish answer; one that does not parse is an error answer."""
    try:
        return _pub_ack(payload)
    except msgspec.DecodeError:
        return PubAck(error=PubAckError(description=f"unreadable PubAck {payload[:80]!r}"))


def ack_stream_seq(reply: bytes) -> int | None:
    """The stream sequence in a JetStream ack subject: ``$JS.ACK.<stream>.<consumer>.
    <delivered>.<stream seq>.<consumer seq>.<time>.<pending>`` (9 tokens; servers from 2.10 may
    add domain and account hash tokens before the stream, and a token at the end)."""
    tokens = reply.split(b".")
    if len(tokens) == 9:
        seq = tokens[5]
    elif len(tokens) >= 11:
        seq = tokens[7]
    else:
        return None
    return int(seq) if seq.isdigit() else None
