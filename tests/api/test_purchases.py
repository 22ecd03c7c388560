"""Pack purchases: orders, signed webhooks, exactly-once crediting, refunds after partial spend.
Every test runs on SQLite and on the run's PostgreSQL database (with the real Redis in CI)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from api.payments import sign
from api.security import issue_token
from api.state import payments_of
from persistence.models import PaymentEvent, TokenPurchase, utcnow
from tests.api.conftest import Api, make_settings, running_app
from tests.conftest import DATABASES

pytestmark = pytest.mark.redis

TEST_SECRET = "test-payment-secret-" + "0" * 16
RZP_WEBHOOK_SECRET = "rzp-webhook-secret-" + "1" * 16
RZP_KEY_ID, RZP_KEY_SECRET = "rzp_test_key", "rzp-key-secret"
STARTER_TOKENS, STARTER_PAISE = 50_000, 9_900
LOGGER = "tokenmeter.payments"


class FakeRazorpayOrders:
    """Stands in for Razorpay's Orders API (POST /v1/orders) and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def post(self, url: str, auth: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((url, auth, payload))
        await asyncio.sleep(0)
        return {"id": f"order_{uuid.uuid4().hex[:14]}", "entity": "order", "amount": payload["amount"],
                "currency": payload["currency"], "receipt": payload["receipt"], "status": "created"}


async def _shop(request: pytest.FixtureRequest, tmp_path: Any, provider: str) -> AsyncIterator[Api]:
    overrides: dict[str, Any] = {
        "payment_provider": provider, "test_payment_secret": TEST_SECRET,
        "razorpay_key_id": RZP_KEY_ID, "razorpay_key_secret": RZP_KEY_SECRET,
        "razorpay_webhook_secret": RZP_WEBHOOK_SECRET,
    }
    if request.param == "postgres":
        overrides["database_url"] = request.getfixturevalue("pg_database")
    async with running_app(make_settings(tmp_path, **overrides)) as a:
        a.orders = FakeRazorpayOrders()  # type: ignore[attr-defined]
        payments_of(a.app).providers["razorpay"].post = a.orders.post  # type: ignore[attr-defined]
        yield a


@pytest.fixture(params=DATABASES)
async def rzp(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    """The app selling through the Razorpay-style provider (orders API faked)."""
    async for a in _shop(request, tmp_path, "razorpay"):
        yield a


@pytest.fixture(params=DATABASES)
async def testpay(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Api]:
    """The app selling through the built-in test provider."""
    async for a in _shop(request, tmp_path, "test"):
        yield a


# -- helpers -----------------------------------------------------------------------------------


async def quick_user(api: Api) -> tuple[str, dict[str, str]]:
    """A free account (10,000 monthly tokens) with a user token, skipping the slow password hash."""
    account = f"u_{uuid.uuid4().hex[:16]}"
    await api.state.rt.meter.open_account(account, plan="free")
    await api.add_account_row(account)
    return account, {"Authorization": f"Bearer {issue_token(api.state.jwt_secret, account, 3600)}"}


async def buy(api: Api, auth: dict[str, str], pack: str = "starter", key: str | None = None) -> dict[str, Any]:
    headers = {**auth, **({"Idempotency-Key": key} if key else {})}
    r = await api.client.post("/api/v1/tokens/purchase", json={"package_id": pack}, headers=headers)
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def rzp_body(event: str, order_id: str, payment_id: str, amount: int = STARTER_PAISE, currency: str = "INR",
             refund_id: str | None = None, refund_amount: int = 0) -> bytes:
    """A webhook body shaped like Razorpay's."""
    payment = {"id": payment_id, "entity": "payment", "amount": amount, "currency": currency, "order_id": order_id,
               "status": "failed" if event == "payment.failed" else "captured", "amount_refunded": refund_amount,
               "method": "upi", "email": "user@example.com"}
    payload: dict[str, Any] = {"payment": {"entity": payment}}
    if refund_id:
        payload["refund"] = {"entity": {"id": refund_id, "entity": "refund", "amount": refund_amount,
                                        "currency": currency, "payment_id": payment_id, "status": "processed"}}
    return json.dumps({"entity": "event", "account_id": "acc_test", "event": event, "contains": sorted(payload),
                       "payload": payload, "created_at": 1_764_000_000}).encode()


async def deliver(api: Api, body: bytes, event_id: str | None = None, secret: str = RZP_WEBHOOK_SECRET,
                  signature: str | None = None) -> Any:
    headers = {"Content-Type": "application/json", "X-Razorpay-Signature": signature or sign(secret, body)}
    if event_id:
        headers["X-Razorpay-Event-Id"] = event_id
    return await api.client.post("/api/v1/payments/webhook/razorpay", content=body, headers=headers)


async def complete(api: Api, fields: dict[str, Any], secret: str = TEST_SECRET) -> Any:
    body = json.dumps(fields).encode()
    return await api.client.post("/api/v1/payments/test/complete", content=body,
                                 headers={"Content-Type": "application/json", "X-Test-Signature": sign(secret, body)})


async def premium(api: Api, account: str) -> int:
    return (await api.state.rt.meter.balance(account)).premium_tokens


async def remaining(api: Api, account: str) -> int:
    return (await api.state.rt.meter.balance(account)).remaining_tokens


async def purchase_row(api: Api, purchase_id: str) -> TokenPurchase:
    async with api.state.rt.db.sessions() as session:
        return (await session.execute(select(TokenPurchase).where(TokenPurchase.id == purchase_id))).scalar_one()


async def events_of(api: Api, purchase_id: str) -> list[PaymentEvent]:
    async with api.state.rt.db.sessions() as session:
        return list((await session.execute(select(PaymentEvent).where(
            PaymentEvent.purchase_id == purchase_id).order_by(PaymentEvent.id))).scalars())


async def history(api: Api, auth: dict[str, str], kind: str, n: int) -> list[dict[str, Any]]:
    """The account's transactions of one type once `n` have reached the database."""
    items: list[dict[str, Any]] = []
    for _ in range(100):
        await api.flush()
        r = await api.client.get(f"/api/v1/tokens/transactions?type={kind}&limit=100", headers=auth)
        items = r.json()
        if len(items) >= n:
            return items
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {n} {kind} transactions, got {len(items)}")


async def spend(api: Api, account: str, tokens: int) -> None:
    """Spend through the gateway's meter endpoint (burn order: monthly first, premium last)."""
    while tokens:
        step = min(tokens, 8_000)
        r = await api.client.post("/api/v1/meter/debit", headers=api.service(),
                                  json={"account_id": account, "tokens": step, "agent": "code"})
        assert r.status_code == 200 and r.json()["allowed"], r.text
        tokens -= step


# -- creating purchases ------------------------------------------------------------------------


async def test_purchase_creates_a_pending_row_and_a_provider_order(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    out = await buy(rzp, auth, "pro")
    assert (out["package_id"], out["tokens"], out["amount"], out["amount_inr"], out["currency"], out["status"],
            out["provider"], out["replayed"]) == ("pro", 200_000, 34_900, "349.00", "INR", "pending", "razorpay", False)
    assert out["order_id"].startswith("order_")
    assert out["checkout"] == {"key": RZP_KEY_ID, "order_id": out["order_id"], "amount": 34_900, "currency": "INR",
                               "name": "tokenmeter", "description": "Pro Pack",
                               "notes": {"purchase_id": out["purchase_id"]}}
    [(url, auth_header, payload)] = rzp.orders.calls  # type: ignore[attr-defined]
    assert url == "https://api.razorpay.com/v1/orders"
    assert base64.b64decode(auth_header).decode() == f"{RZP_KEY_ID}:{RZP_KEY_SECRET}"
    assert (payload["amount"], payload["currency"], payload["receipt"]) == (34_900, "INR", out["purchase_id"])
    row = await purchase_row(rzp, out["purchase_id"])
    assert (row.account_id, row.status, row.provider_order_id, row.tokens) == (account, "pending", out["order_id"],
                                                                               200_000)
    assert await premium(rzp, account) == 0  # nothing until the payment is reported


async def test_idempotent_purchase_creation(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    first = await rzp.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"},
                                  headers={**auth, "Idempotency-Key": "buy-1"})
    again = await rzp.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"},
                                  headers={**auth, "Idempotency-Key": "buy-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert (first.json()["replayed"], again.json()["replayed"]) == (False, True)
    assert again.json()["purchase_id"] == first.json()["purchase_id"]
    assert again.json()["order_id"] == first.json()["order_id"]
    assert len(rzp.orders.calls) == 1  # type: ignore[attr-defined]

    other = await rzp.client.post("/api/v1/tokens/purchase", json={"package_id": "pro"},
                                  headers={**auth, "Idempotency-Key": "buy-1"})
    assert other.status_code == 409 and other.json()["error"] == "idempotency_conflict"

    results = await asyncio.gather(*(rzp.client.post(
        "/api/v1/tokens/purchase", json={"package_id": "unlimited"}, headers={**auth, "Idempotency-Key": "buy-2"})
        for _ in range(5)))
    assert sorted(r.status_code for r in results) == [200, 200, 200, 200, 201]
    assert len({r.json()["purchase_id"] for r in results}) == 1
    assert len({r.json()["order_id"] for r in results}) == 1

    no_key = [await buy(rzp, auth) for _ in range(2)]
    assert no_key[0]["purchase_id"] != no_key[1]["purchase_id"]
    async with rzp.state.rt.db.sessions() as session:
        keys = (await session.execute(select(TokenPurchase.idempotency_key).where(
            TokenPurchase.account_id == account))).scalars().all()
    assert sorted(keys, key=str) == sorted(["buy-1", "buy-2", None, None], key=str)


async def test_unknown_pack_is_422_naming_package_id(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    r = await rzp.client.post("/api/v1/tokens/purchase", json={"package_id": "gold"}, headers=auth)
    assert r.status_code == 422 and r.json()["field"] == "package_id" and "gold" in r.json()["message"]
    missing = await rzp.client.post("/api/v1/tokens/purchase", json={}, headers=auth)
    assert missing.status_code == 422 and missing.json()["field"] == "package_id"
    anonymous = await rzp.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"})
    assert anonymous.status_code == 401
    async with rzp.state.rt.db.sessions() as session:
        n = (await session.execute(select(func.count()).select_from(TokenPurchase).where(
            TokenPurchase.account_id == account))).scalar_one()
    assert n == 0 and rzp.orders.calls == []  # type: ignore[attr-defined]


# -- paid events: exactly once -----------------------------------------------------------------


async def test_webhook_delivered_five_times_concurrently_is_credited_once(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth, key="k-1")
    body = rzp_body("payment.captured", order["order_id"], "pay_1")
    # Five deliveries of the same event race three client retries of the purchase call.
    results = await asyncio.gather(
        *(deliver(rzp, body, event_id="evt_captured_1") for _ in range(5)),
        *(rzp.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"},
                          headers={**auth, "Idempotency-Key": "k-1"}) for _ in range(3)))
    hooks, retries = results[:5], results[5:]
    assert sorted(r.status_code for r in hooks) == [200, 409, 409, 409, 409], [r.text for r in hooks]
    ok = next(r.json() for r in hooks if r.status_code == 200)
    assert (ok["outcome"], ok["credited_tokens"], ok["purchase_status"]) == ("credited", STARTER_TOKENS, "paid")
    assert {r.json()["error"] for r in hooks if r.status_code == 409} == {"duplicate_event"}
    assert {(r.status_code, r.json()["purchase_id"]) for r in retries} == {(200, order["purchase_id"])}

    assert await premium(rzp, account) == STARTER_TOKENS
    assert await remaining(rzp, account) == 10_000 + STARTER_TOKENS
    purchases = await history(rzp, auth, "purchase", 1)  # every journal entry is flushed by now
    assert [(p["tokens"], p["description"]) for p in purchases] == [
        (STARTER_TOKENS, f"Purchase: Starter Pack ({STARTER_TOKENS} tokens)")]
    row = await purchase_row(rzp, order["purchase_id"])
    assert (row.status, row.provider_payment_id, row.credit_transaction_id) == (
        "paid", "pay_1", purchases[0]["transaction_id"])
    assert [(e.event_id, e.outcome, e.tokens) for e in await events_of(rzp, order["purchase_id"])] == [
        ("evt_captured_1", "credited", STARTER_TOKENS)]
    polled = (await rzp.client.get(f"/api/v1/tokens/purchases/{order['purchase_id']}", headers=auth)).json()
    assert (polled["status"], polled["checkout"]) == ("paid", None)


async def test_replayed_event_id_is_409_and_credits_nothing(rzp: Api, caplog: pytest.LogCaptureFixture) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth)
    body = rzp_body("payment.captured", order["order_id"], "pay_2")
    assert (await deliver(rzp, body, event_id="evt_a")).status_code == 200
    with caplog.at_level(logging.INFO, logger=LOGGER):
        replay = await deliver(rzp, body, event_id="evt_a")
        same_payment = await deliver(rzp, body, event_id="evt_b")  # another id for the same capture
        no_header = await deliver(rzp, body)  # id derived from the event and the payment
    assert [r.status_code for r in (replay, same_payment, no_header)] == [409, 409, 409]
    assert replay.json()["error"] == "duplicate_event" and replay.json()["event_id"] == "evt_a"
    assert "replayed" in caplog.text and "evt_a" in caplog.text
    assert await premium(rzp, account) == STARTER_TOKENS
    assert len(await events_of(rzp, order["purchase_id"])) == 1


async def test_bad_signature_is_400_and_credits_nothing(rzp: Api, caplog: pytest.LogCaptureFixture) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth)
    body = rzp_body("payment.captured", order["order_id"], "pay_3")
    tampered = body.replace(b'"amount_refunded": 0', b'"amount_refunded": 1')
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        wrong_secret = await deliver(rzp, body, event_id="evt_x", secret="not-the-secret")
        modified = await deliver(rzp, tampered, event_id="evt_x", signature=sign(RZP_WEBHOOK_SECRET, body))
        garbage = await deliver(rzp, body, event_id="evt_x", signature="zz" * 32)
        missing = await rzp.client.post("/api/v1/payments/webhook/razorpay", content=body,
                                        headers={"Content-Type": "application/json"})
    for r in (wrong_secret, modified, garbage, missing):
        assert r.status_code == 400 and r.json()["error"] == "invalid_signature", r.text
    assert "X-Razorpay-Signature" in missing.json()["message"]
    assert caplog.text.count("invalid_signature") == 4
    assert await premium(rzp, account) == 0
    assert (await purchase_row(rzp, order["purchase_id"])).status == "pending"
    assert await events_of(rzp, order["purchase_id"]) == []
    # The genuine delivery still works afterwards (nothing was recorded for the forgeries).
    assert (await deliver(rzp, body, event_id="evt_x")).status_code == 200
    assert await premium(rzp, account) == STARTER_TOKENS


async def test_failed_payment_credits_nothing(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth)
    r = await deliver(rzp, rzp_body("payment.failed", order["order_id"], "pay_f1"), event_id="evt_f1")
    assert r.status_code == 200 and (r.json()["outcome"], r.json()["credited_tokens"]) == ("failed", 0)
    assert (await purchase_row(rzp, order["purchase_id"])).status == "failed"
    assert await premium(rzp, account) == 0 and await remaining(rzp, account) == 10_000
    again = await deliver(rzp, rzp_body("payment.failed", order["order_id"], "pay_f1"), event_id="evt_f1")
    assert again.status_code == 409
    # The customer retries with another payment on the same order; that one is captured.
    ok = await deliver(rzp, rzp_body("payment.captured", order["order_id"], "pay_f2"), event_id="evt_f2")
    assert ok.status_code == 200 and ok.json()["credited_tokens"] == STARTER_TOKENS
    # A failed attempt reported late changes nothing.
    late = await deliver(rzp, rzp_body("payment.failed", order["order_id"], "pay_f3"), event_id="evt_f3")
    assert late.status_code == 200 and late.json()["outcome"] == "ignored"
    assert (await purchase_row(rzp, order["purchase_id"])).status == "paid"
    assert await premium(rzp, account) == STARTER_TOKENS


async def test_amount_or_currency_mismatch_is_refused(rzp: Api, caplog: pytest.LogCaptureFixture) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        cheap = await deliver(rzp, rzp_body("payment.captured", order["order_id"], "pay_4", amount=100),
                              event_id="evt_m1")
        dollars = await deliver(rzp, rzp_body("payment.captured", order["order_id"], "pay_4", currency="USD"),
                                event_id="evt_m2")
    assert cheap.status_code == 422 and cheap.json()["error"] == "amount_mismatch"
    assert (cheap.json()["field"], cheap.json()["expected"], cheap.json()["got"]) == ("amount", STARTER_PAISE, 100)
    assert dollars.status_code == 422 and dollars.json()["error"] == "currency_mismatch"
    assert "amount_mismatch" in caplog.text and "currency_mismatch" in caplog.text
    assert await premium(rzp, account) == 0
    assert (await purchase_row(rzp, order["purchase_id"])).status == "pending"
    assert await events_of(rzp, order["purchase_id"]) == []
    unknown = await deliver(rzp, rzp_body("payment.captured", "order_nope", "pay_5"), event_id="evt_m3")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_order"
    ignored = await deliver(rzp, rzp_body("order.paid", order["order_id"], "pay_4"), event_id="evt_m4")
    assert ignored.status_code == 200 and ignored.json() == {"status": "ignored"}
    assert await premium(rzp, account) == 0


# -- refunds -----------------------------------------------------------------------------------


async def test_refund_after_partial_spend_takes_back_the_unspent_and_records_the_rest_owed(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth)
    pay = rzp_body("payment.captured", order["order_id"], "pay_r")
    assert (await deliver(rzp, pay, event_id="evt_r0")).status_code == 200
    await spend(rzp, account, 10_000 + 5_000)  # all monthly tokens, then 5,000 premium
    assert await premium(rzp, account) == 45_000

    half = STARTER_PAISE // 2
    first = await deliver(rzp, rzp_body("refund.processed", order["order_id"], "pay_r", refund_id="rfnd_1",
                                        refund_amount=half), event_id="evt_r1")
    assert first.status_code == 200, first.text
    assert (first.json()["refund_tokens"], first.json()["taken_tokens"], first.json()["owed_tokens"]) == (
        25_000, 25_000, 0)
    assert await premium(rzp, account) == 20_000

    rest = await deliver(rzp, rzp_body("refund.processed", order["order_id"], "pay_r", refund_id="rfnd_2",
                                       refund_amount=STARTER_PAISE - half), event_id="evt_r2")
    assert rest.status_code == 200, rest.text
    assert (rest.json()["refund_tokens"], rest.json()["taken_tokens"], rest.json()["owed_tokens"]) == (
        25_000, 20_000, 5_000)
    assert await premium(rzp, account) == 0 and await remaining(rzp, account) == 0

    replay = await deliver(rzp, rzp_body("refund.processed", order["order_id"], "pay_r", refund_id="rfnd_2",
                                         refund_amount=STARTER_PAISE - half), event_id="evt_r2")
    assert replay.status_code == 409
    too_much = await deliver(rzp, rzp_body("refund.processed", order["order_id"], "pay_r", refund_id="rfnd_3",
                                           refund_amount=1), event_id="evt_r3")
    assert too_much.status_code == 422 and too_much.json()["error"] == "refund_exceeds_payment"

    row = await purchase_row(rzp, order["purchase_id"])
    assert (row.status, row.refunded_paise, row.refunded_tokens, row.owed_tokens) == (
        "refunded", STARTER_PAISE, 45_000, 5_000)
    body = (await rzp.client.get(f"/api/v1/tokens/purchases/{order['purchase_id']}", headers=auth)).json()
    assert (body["status"], body["refunded_amount"], body["refunded_tokens"], body["owed_tokens"]) == (
        "refunded", STARTER_PAISE, 45_000, 5_000)
    refunds = await history(rzp, auth, "refund", 2)
    assert sorted(r["tokens"] for r in refunds) == [-25_000, -20_000]
    assert [e.outcome for e in await events_of(rzp, order["purchase_id"])] == ["credited", "refunded", "refunded"]


async def test_events_out_of_order(rzp: Api) -> None:
    account, auth = await quick_user(rzp)
    order = await buy(rzp, auth)
    refund = rzp_body("refund.processed", order["order_id"], "pay_o", refund_id="rfnd_o", refund_amount=STARTER_PAISE)
    early = await deliver(rzp, refund, event_id="evt_o2")
    assert early.status_code == 409 and early.json()["error"] == "not_paid"
    assert await events_of(rzp, order["purchase_id"]) == []  # not recorded: the redelivery will apply it
    assert (await deliver(rzp, rzp_body("payment.captured", order["order_id"], "pay_o"),
                          event_id="evt_o1")).status_code == 200
    assert await premium(rzp, account) == STARTER_TOKENS
    later = await deliver(rzp, refund, event_id="evt_o2")
    assert later.status_code == 200 and later.json()["taken_tokens"] == STARTER_TOKENS
    assert await premium(rzp, account) == 0
    assert (await purchase_row(rzp, order["purchase_id"])).status == "refunded"


# -- the test provider -------------------------------------------------------------------------


async def test_test_provider_checkout_is_completed_by_a_signed_call(testpay: Api) -> None:
    account, auth = await quick_user(testpay)
    order = await buy(testpay, auth, "pro", key="t-1")
    checkout = order["checkout"]
    assert (order["provider"], checkout["url"], checkout["signature_header"]) == (
        "test", "/api/v1/payments/test/complete", "X-Test-Signature")
    assert checkout["body"] == {"order_id": order["order_id"], "status": "paid", "amount": 34_900, "currency": "INR"}

    forged = await complete(testpay, checkout["body"], secret="guess")
    assert forged.status_code == 400 and forged.json()["error"] == "invalid_signature"
    assert await premium(testpay, account) == 0

    results = await asyncio.gather(*(complete(testpay, checkout["body"]) for _ in range(5)))
    assert sorted(r.status_code for r in results) == [200, 409, 409, 409, 409]
    assert await premium(testpay, account) == 200_000
    # The same event through the generic webhook path is the same replay.
    body = json.dumps(checkout["body"]).encode()
    via_hook = await testpay.client.post("/api/v1/payments/webhook/test", content=body,
                                         headers={"X-Test-Signature": sign(TEST_SECRET, body)})
    assert via_hook.status_code == 409
    listed = (await testpay.client.get("/api/v1/tokens/purchases", headers=auth)).json()
    assert [(p["purchase_id"], p["status"], p["tokens"]) for p in listed] == [(order["purchase_id"], "paid", 200_000)]
    purchases = await history(testpay, auth, "purchase", 1)
    assert [p["tokens"] for p in purchases] == [200_000]


async def test_expired_test_checkout_credits_nothing(testpay: Api) -> None:
    account, auth = await quick_user(testpay)
    order = await buy(testpay, auth)
    async with testpay.state.rt.db.sessions() as session, session.begin():
        await session.execute(update(TokenPurchase).where(TokenPurchase.id == order["purchase_id"]).values(
            created_at=utcnow() - timedelta(hours=2)))
    r = await complete(testpay, order["checkout"]["body"])
    assert r.status_code == 410 and r.json()["error"] == "order_expired"
    assert await premium(testpay, account) == 0
    body = (await testpay.client.get(f"/api/v1/tokens/purchases/{order['purchase_id']}", headers=auth)).json()
    assert (body["status"], body["checkout"]) == ("expired", None)
    other_user = (await quick_user(testpay))[1]
    hidden = await testpay.client.get(f"/api/v1/tokens/purchases/{order['purchase_id']}", headers=other_user)
    assert hidden.status_code == 404


async def test_a_redis_outage_mid_credit_is_completed_by_the_redelivery(rzp: Api, monkeypatch: pytest.MonkeyPatch
                                                                        ) -> None:
    from meter import StoreUnavailable

    account, auth = await quick_user(rzp)
    meter = rzp.state.rt.meter
    real_credit = meter.credit
    calls: list[str] = []

    async def lost_answer(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["request_id"])
        if len(calls) == 1:
            raise StoreUnavailable("Redis refused the connection")  # nothing reached Redis
        if len(calls) == 2:
            await real_credit(*args, **kwargs)  # Redis applied it, but the answer was lost
            raise StoreUnavailable("Redis went silent")
        return await real_credit(*args, **kwargs)

    monkeypatch.setattr(meter, "credit", lost_answer)
    order = await buy(rzp, auth)
    body = rzp_body("payment.captured", order["order_id"], "pay_out")
    for _ in range(2):
        r = await deliver(rzp, body, event_id="evt_out")
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
        assert (await purchase_row(rzp, order["purchase_id"])).status == "pending"  # rolled back
        assert await events_of(rzp, order["purchase_id"]) == []
    assert await premium(rzp, account) == STARTER_TOKENS  # the second attempt reached Redis
    done = await deliver(rzp, body, event_id="evt_out")
    assert done.status_code == 200 and done.json()["outcome"] == "credited"
    # The same request id each time. The third delivery replays the credit, or, once the flusher
    # has written it, finds it in the ledger and does not call the meter at all.
    assert calls in ([f"purchase:{order['purchase_id']}"] * 2, [f"purchase:{order['purchase_id']}"] * 3)
    assert await premium(rzp, account) == STARTER_TOKENS
    purchases = await history(rzp, auth, "purchase", 1)
    assert len(purchases) == 1
    assert (await purchase_row(rzp, order["purchase_id"])).credit_transaction_id == purchases[0]["transaction_id"]
    assert (await deliver(rzp, body, event_id="evt_out")).status_code == 409


async def test_a_credit_whose_commit_failed_is_recorded_by_a_redelivery_a_day_later(rzp: Api,
                                                                                     monkeypatch: pytest.MonkeyPatch
                                                                                     ) -> None:
    """The credit ran, the commit after it failed; the provider redelivers after the credit's
    idempotency key expired (24 h): the ledger has the credit, so it is recorded, not made again."""
    from meter import StoreUnavailable
    from meter import keys as keyspace

    account, auth = await quick_user(rzp)
    meter = rzp.state.rt.meter
    real_credit = meter.credit
    calls = 0

    async def applied_then_commit_fails(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        await real_credit(*args, **kwargs)
        raise StoreUnavailable("the commit after the credit failed (test)")

    monkeypatch.setattr(meter, "credit", applied_then_commit_fails)
    order = await buy(rzp, auth)
    body = rzp_body("payment.captured", order["order_id"], "pay_late")
    assert (await deliver(rzp, body, event_id="evt_late")).status_code == 503
    monkeypatch.setattr(meter, "credit", real_credit)
    assert await premium(rzp, account) == STARTER_TOKENS
    await rzp.flush()
    s = rzp.state.rt.settings
    pattern = keyspace.account_keys(account, shards=s.shards, prefix=s.key_prefix).idempotency + "*"
    await rzp.state.rt.redis.delete(*[k async for k in rzp.state.rt.redis.scan_iter(match=pattern)])
    done = await deliver(rzp, body, event_id="evt_late")
    assert done.status_code == 200 and done.json()["outcome"] == "credited", done.text
    assert calls == 1 and await premium(rzp, account) == STARTER_TOKENS  # credited once
    purchases = await history(rzp, auth, "purchase", 1)
    assert len(purchases) == 1 and done.json()["transaction_id"] == purchases[0]["transaction_id"]
    assert (await purchase_row(rzp, order["purchase_id"])).credit_transaction_id == purchases[0]["transaction_id"]
