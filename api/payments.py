"""Payment providers: create an order for a purchase; verify and parse a webhook into one
normalized event. Two providers: `test` (built in, for development and tests; its checkout is
completed by a signed call) and `razorpay` (Orders API + webhooks signed with HMAC-SHA256 of the
raw body). What an event does to a purchase and a wallet lives in `api.billing`.
No web framework here: the app builds one `Payments` in its state (api/state.py).

Secrets come from settings only: TOKENMETER_TEST_PAYMENT_SECRET, TOKENMETER_RAZORPAY_KEY_ID,
TOKENMETER_RAZORPAY_KEY_SECRET, TOKENMETER_RAZORPAY_WEBHOOK_SECRET."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

__all__ = ["BadPayload", "BadSignature", "NotConfigured", "Order", "PaymentProvider", "Payments",
           "ProviderError", "RazorpayProvider", "TestProvider", "WebhookEvent", "sign"]

log = logging.getLogger("tokenmeter.payments")

EventKind = Literal["paid", "failed", "refunded"]


class BadSignature(Exception):
    """The webhook's signature is missing or does not match its raw body."""


class BadPayload(Exception):
    """A correctly signed body that is not an event this provider understands."""


class NotConfigured(Exception):
    """The provider lacks its secret (e.g. TOKENMETER_RAZORPAY_WEBHOOK_SECRET)."""


class ProviderError(Exception):
    """The provider could not create an order (network, auth, unexpected answer)."""


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    amount: int  # paise
    currency: str


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One verified provider event, normalized. `amount` is the payment's amount (paise);
    `refunded_amount` the amount of this refund (refunded events only)."""

    provider: str
    event_id: str
    event_type: str  # the provider's own name, e.g. payment.captured
    kind: EventKind
    order_id: str
    object_id: str  # payment id (paid, failed) or refund id (refunded)
    amount: int
    currency: str
    payment_id: str | None = None
    refunded_amount: int = 0


@dataclass(frozen=True, slots=True)
class CheckoutOf:
    """What a provider needs to tell a frontend how to pay one purchase."""

    purchase_id: str
    order_id: str
    amount: int
    currency: str
    description: str


class PaymentProvider(Protocol):
    name: str
    #: True when the provider's checkout closes with the purchase (a late "paid" is refused);
    #: False when a late capture is real money that must still be credited.
    checkout_closes: bool

    async def create_order(self, *, purchase_id: str, amount: int, currency: str,
                           notes: Mapping[str, str]) -> Order: ...

    def checkout(self, c: CheckoutOf) -> dict[str, Any]: ...

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent | None:
        """Verify the signature of the raw body, then parse. None: a signed event of a type this
        service does not act on. Raises BadSignature, BadPayload or NotConfigured."""
        ...


def sign(secret: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of `body` under `secret` (both providers' webhook signature)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _verify(secret: str | None, body: bytes, signature: str | None, header: str) -> None:
    if not secret:
        raise NotConfigured("no webhook secret configured")
    if not signature:
        raise BadSignature(f"missing {header} header")
    if not hmac.compare_digest(sign(secret, body).encode(), signature.strip().lower().encode()):
        raise BadSignature(f"{header} does not match the body")


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadPayload(f"body is not JSON: {exc}") from None
    except RecursionError:  # a signed body nested past the parser's depth is still only bad input
        raise BadPayload("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadPayload("body must be a JSON object")
    return data


def _str(d: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    v = d.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not 0 < len(v) <= 128 or not v.isprintable():
        raise BadPayload(f"{where}.{key}: a string of 1-128 printable characters is required")
    return v


def _int(d: Mapping[str, Any], key: str, where: str, *, low: int = 0) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 2**53:
        raise BadPayload(f"{where}.{key}: an integer of at least {low} is required")
    return v


def _currency(d: Mapping[str, Any], where: str) -> str:
    c = _str(d, "currency", where)
    if len(c) != 3:
        raise BadPayload(f"{where}.currency: a 3-letter code is required")
    return c.upper()


# -- test provider -----------------------------------------------------------------------------


class TestProvider:
    """Built-in provider for development and tests. Its orders are `order_test_<purchase>`; the
    checkout is completed by `POST /api/v1/payments/test/complete` with a JSON body
    `{"order_id", "status": "paid"|"failed"|"refunded", "amount", "currency", "payment_id"?,
    "refund_id"?, "refunded_amount"?, "event_id"?}` signed in `X-Test-Signature` (hex
    HMAC-SHA256 of the raw body under the test secret). Without `event_id` the event id is
    `<status>:<payment or refund id>`, so a retried completion is a replay."""

    __test__ = False  # not a pytest class
    name = "test"
    checkout_closes = True
    signature_header = "X-Test-Signature"

    def __init__(self, secret: str) -> None:
        self.secret = secret

    async def create_order(self, *, purchase_id: str, amount: int, currency: str,
                           notes: Mapping[str, str]) -> Order:
        return Order(f"order_test_{purchase_id.replace('-', '')}", amount, currency)

    def checkout(self, c: CheckoutOf) -> dict[str, Any]:
        body = {"order_id": c.order_id, "status": "paid", "amount": c.amount, "currency": c.currency}
        return {
            "url": "/api/v1/payments/test/complete", "method": "POST", "body": body,
            "signature_header": self.signature_header,
            "instructions": "POST the body (or status failed) to the url with the hex HMAC-SHA256 of the raw "
                            "body under TOKENMETER_TEST_PAYMENT_SECRET in the signature header.",
        }

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent | None:
        _verify(self.secret, body, headers.get(self.signature_header), self.signature_header)
        d = _json(body)
        status = d.get("status")
        if status not in ("paid", "failed", "refunded"):
            raise BadPayload("status: one of paid, failed, refunded")
        order_id = _str(d, "order_id", "body")
        payment_id = _str(d, "payment_id", "body", required=False) or f"pay_test_{order_id.removeprefix('order_test_')}"
        refund_id, refunded = "", 0
        if status == "refunded":
            refund_id = _str(d, "refund_id", "body")
            refunded = _int(d, "refunded_amount", "body", low=1)
        object_id = refund_id or payment_id
        event_id = _str(d, "event_id", "body", required=False) or f"{status}:{object_id}"
        return WebhookEvent(provider=self.name, event_id=event_id, event_type=f"test.{status}", kind=status,
                            order_id=order_id, object_id=object_id, amount=_int(d, "amount", "body"),
                            currency=_currency(d, "body"), payment_id=payment_id, refunded_amount=refunded)


# -- Razorpay ----------------------------------------------------------------------------------

HttpPost = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _urllib_post(url: str, basic_auth: str, payload: dict[str, Any]) -> dict[str, Any]:
    """POST JSON with HTTP basic auth (stdlib; run in a thread). Returns the JSON answer."""

    def go() -> dict[str, Any]:
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Basic {basic_auth}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ProviderError(f"HTTP {exc.code}: {exc.read()[:300]!r}") from None
        except (OSError, ValueError) as exc:
            raise ProviderError(str(exc)) from None
        if not isinstance(answer, dict):
            raise ProviderError("unexpected answer")
        return answer

    return await asyncio.to_thread(go)


class RazorpayProvider:
    """Razorpay: orders through the Orders API (`POST /v1/orders`, basic auth with the key id and
    secret); webhooks `payment.captured`, `payment.failed`, `refund.processed` verified by
    `X-Razorpay-Signature` = hex HMAC-SHA256 of the raw body under the webhook secret. The event id
    is the `X-Razorpay-Event-Id` header (else `<event>:<payment or refund id>`). Other event types
    are acknowledged and ignored. `post` can be replaced (tests) by any `async (url, auth, json)`."""

    name = "razorpay"
    checkout_closes = False  # a captured payment is real money: it is credited even if late
    signature_header = "X-Razorpay-Signature"
    EVENTS: ClassVar[dict[str, EventKind]] = {"payment.captured": "paid", "payment.failed": "failed",
                                              "refund.processed": "refunded"}

    def __init__(self, *, key_id: str | None, key_secret: str | None, webhook_secret: str | None,
                 api_url: str = "https://api.razorpay.com/v1", post: HttpPost | None = None) -> None:
        self.key_id, self.key_secret, self.webhook_secret = key_id, key_secret, webhook_secret
        self.api_url = api_url.rstrip("/")
        self.post: HttpPost = post or _urllib_post

    async def create_order(self, *, purchase_id: str, amount: int, currency: str,
                           notes: Mapping[str, str]) -> Order:
        if not (self.key_id and self.key_secret):
            raise NotConfigured("TOKENMETER_RAZORPAY_KEY_ID / TOKENMETER_RAZORPAY_KEY_SECRET are not set")
        auth = base64.b64encode(f"{self.key_id}:{self.key_secret}".encode()).decode()
        answer = await self.post(f"{self.api_url}/orders", auth, {
            "amount": amount, "currency": currency, "receipt": purchase_id[:40], "notes": dict(notes)})
        order_id = answer.get("id")
        if not isinstance(order_id, str) or not order_id or answer.get("amount") != amount \
                or str(answer.get("currency", "")).upper() != currency:
            raise ProviderError(f"unexpected order: {str(answer)[:300]}")
        return Order(order_id, amount, currency)

    def checkout(self, c: CheckoutOf) -> dict[str, Any]:
        """The options of Razorpay Checkout (checkout.js)."""
        return {"key": self.key_id, "order_id": c.order_id, "amount": c.amount, "currency": c.currency,
                "name": "tokenmeter", "description": c.description, "notes": {"purchase_id": c.purchase_id}}

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent | None:
        _verify(self.webhook_secret, body, headers.get(self.signature_header), self.signature_header)
        d = _json(body)
        event_type = d.get("event")
        if not isinstance(event_type, str):
            raise BadPayload("event: the event type is required")
        kind = self.EVENTS.get(event_type)
        if kind is None:
            return None
        payload = d.get("payload")
        payment = _entity(payload, "payment")
        order_id = _str(payment, "order_id", "payload.payment.entity")
        payment_id = _str(payment, "id", "payload.payment.entity")
        amount = _int(payment, "amount", "payload.payment.entity")
        currency = _currency(payment, "payload.payment.entity")
        object_id, refunded = payment_id, 0
        if kind == "refunded":
            refund = _entity(payload, "refund")
            object_id = _str(refund, "id", "payload.refund.entity")
            refunded = _int(refund, "amount", "payload.refund.entity", low=1)
            if _currency(refund, "payload.refund.entity") != currency:
                raise BadPayload("payload.refund.entity.currency differs from the payment's")
            if refund.get("payment_id") not in (None, payment_id):
                raise BadPayload("payload.refund.entity.payment_id differs from the payment's id")
        header_id = headers.get("X-Razorpay-Event-Id")
        event_id = header_id if header_id and len(header_id) <= 128 and header_id.isprintable() \
            else f"{event_type}:{object_id}"
        return WebhookEvent(provider=self.name, event_id=event_id, event_type=event_type, kind=kind,
                            order_id=order_id, object_id=object_id, amount=amount, currency=currency,
                            payment_id=payment_id, refunded_amount=refunded)


def _entity(payload: Any, name: str) -> dict[str, Any]:
    entity = payload.get(name, {}).get("entity") if isinstance(payload, dict) and \
        isinstance(payload.get(name), dict) else None
    if not isinstance(entity, dict):
        raise BadPayload(f"payload.{name}.entity is required")
    return entity


# -- registry ----------------------------------------------------------------------------------


@dataclass
class Payments:
    """The providers of one running app; `default` makes new purchases."""

    providers: dict[str, PaymentProvider]
    default: str

    def get(self, name: str) -> PaymentProvider | None:
        return self.providers.get(name)

    @classmethod
    def build(cls, settings: Any) -> Payments:
        secret = settings.test_payment_secret
        if not secret:
            # Random per process and never logged: whoever knows it can mark test checkouts paid.
            # `tokenmeter serve` sets one per run for all its workers and prints it in its banner.
            secret = secrets.token_hex(32)
            if settings.payment_provider == "test":
                log.warning("test payment provider: TOKENMETER_TEST_PAYMENT_SECRET is not set; test checkouts "
                            "are signed with a random per-process secret (development only)")
        razorpay = RazorpayProvider(key_id=settings.razorpay_key_id, key_secret=settings.razorpay_key_secret,
                                    webhook_secret=settings.razorpay_webhook_secret,
                                    api_url=settings.razorpay_api_url)
        return cls({"test": TestProvider(secret), "razorpay": razorpay}, settings.payment_provider)
