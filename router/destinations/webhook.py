"""``webhook``: POST events as JSON to a URL, signed when a secret is set.

One event per request sends the event itself; with ``batch_size`` > 1 the body is
``{"batch": [...]}``. With a ``secret`` every request carries Standard Webhooks headers
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``) and Segment's
``X-Signature`` (hex HMAC-SHA1 of the body), so either kind of receiver can verify it.
``webhook-id`` is the event's messageId (for a batch, a digest of its messageIds), so it
stays the same across retries and receivers can drop repeats.

Requests go through ``router.http_client`` rather than httpx: one event per request is this
destination's hot path, and httpx under trio caps it at a few hundred requests/s.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence

import msgspec

from router.destinations.base import AttemptResult, BuildContext, Delivery
from router.errors import PermanentDeliveryError, RetryableDeliveryError
from router.http_client import HttpClient, HttpClientError, RequestTimeout, check_header, parse_url
from router.retry import classify_status, parse_retry_after

EXCERPT_BYTES = 512
USER_AGENT = "router/0.1"


class WebhookOptions(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    headers: dict[str, str] = {}
    secret: str | None = None


class Signer:
    """Standard Webhooks v1 signatures plus Segment's X-Signature."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        # Standard Webhooks secrets are "whsec_" + base64 key; anything else is used as is.
        if secret.startswith("whsec_"):
            self._key = base64.b64decode(secret.removeprefix("whsec_"))
        else:
            self._key = secret.encode()

    def headers(self, webhook_id: str, body: bytes, timestamp: int) -> dict[str, str]:
        signed = f"{webhook_id}.{timestamp}.".encode() + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        segment = hmac.new(self._secret.encode(), body, hashlib.sha1).hexdigest()
        return {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
            "x-signature": segment,
        }


def batch_id(batch: Sequence[Delivery]) -> str:
    if len(batch) == 1:
        return batch[0].message_id
    digest = hashlib.sha256("\n".join(d.message_id for d in batch).encode()).hexdigest()
    return f"batch_{digest[:32]}"


def encode_body(batch: Sequence[Delivery], *, as_batch: bool) -> bytes:
    if not as_batch:
        return batch[0].body
    return b'{"batch":[' + b",".join(d.body for d in batch) + b"]}"


class WebhookDestination:
    def __init__(self, context: BuildContext, *, client: HttpClient | None = None):
        options = context.options_as(WebhookOptions)
        try:
            self._url = parse_url(options.url)
        except ValueError as exc:
            raise context.error("url", str(exc)) from exc
        if options.secret == "":
            raise context.error("secret", "empty secret")
        try:
            self._signer = Signer(options.secret) if options.secret else None
        except ValueError as exc:
            raise context.error("secret", f"a 'whsec_' secret must be base64: {exc}") from exc
        self._headers = {"content-type": "application/json", "user-agent": USER_AGENT}
        self._headers.update({k.lower(): v for k, v in options.headers.items()})
        for name, value in self._headers.items():
            try:
                check_header(name, value)
            except ValueError as exc:
                raise context.error(f"headers.{name}", str(exc)) from exc
        self._as_batch = context.batch_size > 1
        # ``client``: the seam for tests and embedders. We read no more of an error answer
        # than the excerpt we report. No timeout of its own: the dispatcher bounds every
        # send by the destination's ``timeout``.
        if client is None:
            client = HttpClient(timeout=None, max_body=EXCERPT_BYTES)
        self._client = client

    async def send(self, batch: Sequence[Delivery]) -> Sequence[AttemptResult] | None:
        body = encode_body(batch, as_batch=self._as_batch)
        headers = dict(self._headers)
        if self._signer is not None:
            headers.update(self._signer.headers(batch_id(batch), body, int(time.time())))
        try:
            response = await self._client.post(self._url, body, headers)
        except RequestTimeout as exc:
            raise RetryableDeliveryError(f"timed out: {exc}") from exc
        except HttpClientError as exc:
            raise RetryableDeliveryError(f"connection failed: {exc}") from exc
        ok, retryable = classify_status(response.status)
        if ok:
            return None
        detail = response.body[:EXCERPT_BYTES].decode("utf-8", "replace")
        if retryable:
            retry_after = parse_retry_after(response.headers.get("retry-after"), now=time.time())
            raise RetryableDeliveryError(
                f"HTTP {response.status}",
                status=response.status,
                detail=detail,
                retry_after=retry_after,
            )
        raise PermanentDeliveryError(
            f"HTTP {response.status}", status=response.status, detail=detail
        )

    async def aclose(self) -> None:
        await self._client.aclose()
