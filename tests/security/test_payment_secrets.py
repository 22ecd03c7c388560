"""Finding 9 (payments): with the default `test` provider and no TOKENMETER_TEST_PAYMENT_SECRET
the signing secret is random per process (not derived from the JWT secret) and never logged:
logs captured across startup, purchase list, checkout and webhook never contain it."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

import pytest

from api.payments import payments_of, sign
from tests.api.conftest import make_settings, running_app
from tests.api.test_purchases import quick_user

pytestmark = pytest.mark.redis


async def test_the_dev_payment_secret_is_random_and_never_logged(tmp_path: Any,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(tmp_path, payment_provider="test", test_payment_secret=None)
    with caplog.at_level(logging.DEBUG):
        async with running_app(settings) as api:
            _, auth = await quick_user(api)
            listed = await api.client.get("/api/v1/tokens/purchases", headers=auth)  # built the providers
            assert listed.status_code == 200, listed.text
            secret = payments_of(api.app).providers["test"].secret  # type: ignore[attr-defined]
            bought = await api.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"}, headers=auth)
            assert bought.status_code == 201, bought.text
            body = json.dumps(bought.json()["checkout"]["body"]).encode()
            paid = await api.client.post("/api/v1/payments/test/complete", content=body, headers={
                "Content-Type": "application/json", "X-Test-Signature": sign(secret, body)})
            assert paid.status_code == 200 and paid.json()["outcome"] == "credited", paid.text
            forged = await api.client.post("/api/v1/payments/webhook/test", content=b"{}", headers={
                "Content-Type": "application/json", "X-Test-Signature": "0" * 64})
            assert forged.status_code == 400
            assert secret not in bought.text + paid.text + forged.text
    assert caplog.records, "nothing was logged: the capture did not work"
    assert secret not in caplog.text
    assert all(secret not in str(r.args) for r in caplog.records)
    # Not guessable from the JWT secret (the old derivation), and a new process draws a new one.
    assert secret != hmac.new(str(settings.jwt_secret).encode(), b"tokenmeter test payments",
                              hashlib.sha256).hexdigest()
    async with running_app(settings) as again:
        assert payments_of(again.app).providers["test"].secret != secret  # type: ignore[attr-defined]
    assert len(secret) >= 32
