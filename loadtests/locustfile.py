"""Locust load test of tokenmeter that keeps the books: every answer is recorded, so the run can
be checked afterwards (`tokenmeter loadtest` / loadtests/loadtest.py does: balances, ledger rows,
reconcile).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --headless -u 50 -r 10 -t 30s

Environment: TOKENMETER_MASTER_KEY (a key with the meter and admin scopes), LOADTEST_ACCOUNTS
(gateway accounts, default 2,000), LOADTEST_TEST_PAYMENT_SECRET (the service's test provider
secret: buyers complete checkouts only when it is given), LOADTEST_BOOKS (where the books are
written at the end, JSON).

User classes, by weight: a gateway (debit; reserve → settle or release; ~5% of calls retried
with the same Idempotency-Key; some accounts running dry, some on a plan with a small daily cap),
a frontend (balance, transactions, analytics), a buyer (a starter pack through the test
provider) and a redeemer (promo codes). Locust stops users mid-request at --run-time's end, so
every call is in `inflight` until its answer is read; at test stop those are sent again with
the same key (charged at most once) before the books are written.
"""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from collections import defaultdict
from typing import Any

import httpx
from locust import FastHttpUser, between, events, task

from api.payments import sign

KEY = os.environ.get("TOKENMETER_MASTER_KEY", "")
ACCOUNTS = int(os.environ.get("LOADTEST_ACCOUNTS", "2000"))
PAY_SECRET = os.environ.get("LOADTEST_TEST_PAYMENT_SECRET", "")
BOOKS = os.environ.get("LOADTEST_BOOKS", "")
RUN = uuid.uuid4().hex[:6]
SVC = {"Authorization": f"Bearer {KEY}"}
DRY_EVERY = 10  # every 10th gateway account starts with little left: it runs dry
CAPPED_EVERY = 7  # every 7th is on plan 'free' (100 requests a day): it hits the daily cap


class Books:
    """What the answers said, per account: charged tokens by transaction id, credits, open holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.charged: dict[str, dict[str, int]] = defaultdict(dict)  # account -> transaction id -> tokens
        self.credited: dict[str, int] = defaultdict(int)
        self.start: dict[str, int] = {}
        self.setup: dict[str, list[str]] = defaultdict(list)  # provisioning debits (before the start balance)
        self.inflight: dict[str, tuple[str, str, dict[str, Any]]] = {}  # key -> (account, path, json)
        self.open_holds: dict[str, tuple[str, int]] = {}  # hold -> (account, tokens)
        self.answers: dict[str, int] = defaultdict(int)  # status -> count
        self.retries = 0
        self.resent = 0

    def record(self, account: str, path: str, status: int, body: dict[str, Any]) -> None:
        with self.lock:
            self.answers[str(status)] += 1
            if status != 200:
                return
            if path.endswith("/debit"):
                self.charged[account][body["transaction_id"]] = body["_tokens"]
            elif path.endswith("/settle"):
                self.charged[account][body["transaction_id"]] = body["charged_tokens"]


BOOKS_ = Books()
HOT = [f"lt{RUN}-{CAPPED_EVERY}", f"lt{RUN}-{3 * CAPPED_EVERY}"]  # on 'free' and not dry (7, 21)


def _accounts() -> list[str]:
    return [f"lt{RUN}-{i}" for i in range(ACCOUNTS)]


def _pool() -> list[str]:
    """The accounts of ordinary calls: all but the hot ones, which only small calls reach (so they
    hit the daily cap rather than running dry)."""
    global _POOL
    if not _POOL:
        _POOL = [a for a in _accounts() if a not in HOT] or _accounts()
    return _POOL


_POOL: list[str] = []


@events.test_start.add_listener
def provision(environment: Any, **_: Any) -> None:
    """Open the gateway accounts: some on 'free' (daily cap 100), the dry ones nearly spent."""
    host = environment.host
    with httpx.Client(base_url=host, headers=SVC, timeout=30) as client:
        for i, account in enumerate(_accounts()):
            r = client.post("/api/v1/meter/accounts", json={"account_id": account,
                                                            "plan": "free" if i % CAPPED_EVERY == 0 else "pro"})
            r.raise_for_status()
            if i % DRY_EVERY == 0:  # spend all but ~3,000 up front, through the meter as any call
                left = int(r.json()["remaining_tokens"])
                while left > 3_000:
                    n = min(left - 3_000, 8_000)
                    d = client.post("/api/v1/meter/debit", json={"account_id": account, "tokens": n})
                    d.raise_for_status()
                    left = int(d.json()["remaining_tokens"])
                    BOOKS_.setup[account].append(d.json()["transaction_id"])
            b = client.get(f"/api/v1/meter/accounts/{account}/balance").json()
            BOOKS_.start[account] = int(b["remaining_tokens"])


@events.test_stop.add_listener
def settle_the_books(environment: Any, **_: Any) -> None:
    """Send again what was cut off (same keys), release holds left open, write the books."""
    with httpx.Client(base_url=environment.host, headers=SVC, timeout=30) as client:
        for key, (account, path, body) in list(BOOKS_.inflight.items()):
            r = client.post(path, json=body, headers={"Idempotency-Key": key})
            BOOKS_.resent += 1
            data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code == 200 and path.endswith("/reserve"):
                BOOKS_.open_holds[data["hold_id"]] = (account, body["tokens"])
            BOOKS_.record(account, path, r.status_code, {**data, "_tokens": body.get("tokens", 0)})
            BOOKS_.inflight.pop(key, None)
        for hold, (account, _tokens) in list(BOOKS_.open_holds.items()):
            r = client.post("/api/v1/meter/release", json={"account_id": account, "hold_id": hold},
                            headers={"Idempotency-Key": f"release-{hold}"})
            if r.status_code in (200, 404):  # 404: it expired on its own, which also gives it back
                BOOKS_.open_holds.pop(hold, None)
    if BOOKS:
        with open(BOOKS, "w") as f:
            json.dump({"start": BOOKS_.start, "credited": BOOKS_.credited, "answers": BOOKS_.answers,
                       "charged": {a: sum(t.values()) for a, t in BOOKS_.charged.items()},
                       "transactions": {a: sorted(t) for a, t in BOOKS_.charged.items()},
                       "open_holds": len(BOOKS_.open_holds), "setup": BOOKS_.setup, "retries": BOOKS_.retries,
                       "resent": BOOKS_.resent}, f)


class Gateway(FastHttpUser):
    """An API gateway: debits, and reserve → settle/release, with Idempotency-Keys."""

    weight = 8
    wait_time = between(0.0, 0.02)

    def _call(self, account: str, path: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        BOOKS_.inflight[key] = (account, path, body)
        with self.client.post(path, json=body, headers={**SVC, "Idempotency-Key": key}, catch_response=True,
                              name=path) as r:
            status = r.status_code
            data: dict[str, Any] = {}
            if status in (200, 402, 409, 429):
                r.success()  # refusals are answers, not failures
                data = r.json() if status == 200 else {}
            BOOKS_.record(account, path, status, {**data, "_tokens": body.get("tokens", 0)})
        if status in (200, 402, 404, 409, 422, 429):  # an answer was read: not in flight any more
            BOOKS_.inflight.pop(key, None)
        return status, data

    def _key(self) -> str:
        return f"{RUN}-{uuid.uuid4().hex}"

    @task(6)
    def debit(self) -> None:
        # a fifth of the calls are small ones of two hot accounts on 'free': they reach the daily cap
        hot = random.random() < 0.2
        account = random.choice(HOT if hot else _pool())
        tokens = random.randint(1, 20) if hot else random.randint(50, 2_000)
        key, body = self._key(), {"account_id": account, "tokens": tokens, "agent": "code", "model": "gpt-4o-mini"}
        self._call(account, "/api/v1/meter/debit", body, key)
        if random.random() < 0.05:  # a retry storm's share: the same key, charged once
            BOOKS_.retries += 1
            self._call(account, "/api/v1/meter/debit", body, key)

    @task(3)
    def reserve_then_settle(self) -> None:
        account = random.choice(_pool())
        tokens = random.randint(500, 4_000)
        status, data = self._call(account, "/api/v1/meter/reserve", {"account_id": account, "tokens": tokens},
                                  self._key())
        if status != 200:
            return
        hold = data["hold_id"]
        BOOKS_.open_holds[hold] = (account, tokens)
        if random.random() < 0.2:
            self._call(account, "/api/v1/meter/release", {"account_id": account, "hold_id": hold}, self._key())
        else:
            self._call(account, "/api/v1/meter/settle", {"account_id": account, "hold_id": hold,
                                                         "actual_tokens": random.randint(0, tokens + 500),
                                                         "model": "claude-3-5-sonnet-20241022"}, self._key())
        BOOKS_.open_holds.pop(hold, None)


class _Person(FastHttpUser):
    abstract = True
    wait_time = between(0.05, 0.3)
    account = ""
    auth: dict[str, str] = {}  # noqa: RUF012  (set per user in on_start)

    def on_start(self) -> None:
        r = self.client.post("/api/v1/auth/register", json={"email": f"{uuid.uuid4().hex[:12]}@load.test",
                                                            "password": "load-test-pass-1"}, name="register")
        data = r.json()
        self.account, self.auth = data["user_id"], {"Authorization": f"Bearer {data['access_token']}"}
        BOOKS_.start[self.account] = 10_000


class Frontend(_Person):
    weight = 3

    @task(4)
    def balance(self) -> None:
        self.client.get("/api/v1/tokens/balance", headers=self.auth)

    @task(2)
    def transactions(self) -> None:
        self.client.get("/api/v1/tokens/transactions?limit=20", headers=self.auth)

    @task(1)
    def analytics(self) -> None:
        self.client.get("/api/v1/tokens/analytics", headers=self.auth)


class Buyer(_Person):
    weight = 1

    @task
    def buy_starter(self) -> None:
        if not PAY_SECRET:
            return
        key = f"buy-{uuid.uuid4().hex}"
        r = self.client.post("/api/v1/tokens/purchase", json={"package_id": "starter"},
                             headers={**self.auth, "Idempotency-Key": key}, name="purchase")
        if r.status_code != 201 and r.status_code != 200:
            return
        checkout = r.json()["checkout"]
        body = json.dumps(checkout["body"]).encode()
        done = self.client.post(checkout["url"], data=body, name="payment complete",
                                headers={"Content-Type": "application/json",
                                         checkout["signature_header"]: sign(PAY_SECRET, body)})
        if done.status_code == 200:
            with BOOKS_.lock:
                BOOKS_.credited[self.account] += int(r.json()["tokens"])


class Redeemer(_Person):
    weight = 1

    @task
    def redeem(self) -> None:
        code = random.choice(["WELCOME2024", "LAUNCH50", "BETA100", "NOPE-0000"])
        with self.client.post("/api/v1/tokens/redeem-code", json={"code": code}, headers=self.auth,
                              catch_response=True, name="redeem-code") as r:
            if r.status_code == 200:
                with BOOKS_.lock:
                    BOOKS_.credited[self.account] += int(r.json()["bonus_tokens"])
            if r.status_code in (200, 404, 409, 410, 422, 429):
                r.success()
