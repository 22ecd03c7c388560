"""Finding 8: a correctly signed webhook body nested 20,000 deep is bad input (400), never a
500 (`RecursionError` from the JSON parser), on both providers; nothing is recorded."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from api.payments import sign
from persistence.models import PaymentEvent
from tests.api.conftest import Api
from tests.api.test_purchases import RZP_WEBHOOK_SECRET, TEST_SECRET, rzp, testpay

pytestmark = pytest.mark.redis
__all__ = ["rzp", "testpay"]  # the fixtures, imported for pytest

DEPTH = 20_000


def deep_body() -> bytes:
    """A JSON object whose only value is 20,000 nested arrays (40 KB: under the 64 KB body cap)."""
    return b'{"event": "payment.captured", "payload": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"


async def _events(api: Api) -> int:
    async with api.state.rt.db.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(PaymentEvent))).scalar_one())


async def test_deep_json_on_the_razorpay_webhook_is_400(rzp: Api) -> None:
    body, before = deep_body(), await _events(rzp)
    r = await rzp.client.post("/api/v1/payments/webhook/razorpay", content=body, headers={
        "Content-Type": "application/json", "X-Razorpay-Signature": sign(RZP_WEBHOOK_SECRET, body)})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_payload"
    assert await _events(rzp) == before  # nothing recorded (the Postgres database is the run's)


@pytest.mark.parametrize("url", ["/api/v1/payments/test/complete", "/api/v1/payments/webhook/test"])
async def test_deep_json_on_the_test_provider_is_400(testpay: Api, url: str) -> None:
    body, before = deep_body(), await _events(testpay)
    r = await testpay.client.post(url, content=body, headers={
        "Content-Type": "application/json", "X-Test-Signature": sign(TEST_SECRET, body)})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_payload"
    assert await _events(testpay) == before
