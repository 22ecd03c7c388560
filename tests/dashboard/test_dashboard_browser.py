"""The dashboard in a real browser (Debian's Chromium under Playwright) against the real service on
loopback: register → 10,000 → a debit made through the meter API shows within 2 s without a
reload → WELCOME2024 redeemed with the keyboard only → the promo refusals, each with its own
message → the starter pack bought through the test provider (a wrong secret and a declined
payment first, shown plainly) → history and charts show the rows → paging and filters → the
out-of-tokens banner → the live balance survives a server crash → sign in again.

A screenshot of each step goes to $TOKENMETER_ARTIFACTS/dashboard (else the test's tmp_path);
TOKENMETER_UPDATE_SCREENSHOT=1 also writes docs/img/dashboard.png (the README's picture)."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.dashboard.service import ROOT, TEST_PAYMENT_SECRET, Service

PASSWORD = "a-long-passphrase-for-the-dashboard"
STEP_TIMEOUT_MS = 5_000
LIVE_WITHIN_MS = 2_000
# (agent, model) of the ten debits of 5,000 that page the history and bring the banner back
DEBITS = [("idea", "haiku"), ("uml", "haiku"), ("report", "sonnet"), ("code", "sonnet"), ("viva", "haiku")] * 2


def _inr(paise: int) -> str:
    return f"₹{paise // 100:,}.{paise % 100:02d}"


def _usd(micros: int) -> str:
    """The page's rule (format.js usdMicros), in integers."""
    if micros >= 1_000_000:
        cents = (micros + 5_000) // 10_000
        return f"${cents // 100:,}.{cents % 100:02d}"
    units = (micros + 50) // 100
    return f"${units // 10_000:,}.{units % 10_000:04d}"


def _luminance(rgb: str) -> float:
    parts = [int(x) / 255 for x in re.findall(r"\d+", rgb)[:3]]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in parts]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(fg: str, bg: str) -> float:
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


COLOURS_JS = """(selectors) => selectors.map((sel) => {
  const el = document.querySelector(sel);
  if (!el) return [sel, null, null];
  let node = el, bg = null;
  while (node && !bg) {
    const b = getComputedStyle(node).backgroundColor;
    if (b && b !== 'rgba(0, 0, 0, 0)' && b !== 'transparent') bg = b;
    node = node.parentElement;
  }
  return [sel, getComputedStyle(el).color, bg || 'rgb(255, 255, 255)'];
})"""

UNLABELLED_JS = """() => [...document.querySelectorAll('input, select')]
  .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map((e) => e.id || e.name)"""


class Steps:
    """The page, the service, and the screenshots of one run."""

    def __init__(self, page: Any, service: Service, artifacts: Path) -> None:
        self.page, self.service, self.artifacts = page, service, artifacts
        self.shots: list[Path] = []

    def shot(self, name: str) -> Path:
        path = self.artifacts / f"{len(self.shots) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        self.shots.append(path)
        return path

    def text(self, selector: str) -> str:
        return str(self.page.locator(selector).inner_text()).strip()

    def debit(self, account: str, tokens: int, agent: str, model: str) -> None:
        r = self.service.call("POST", "/api/v1/meter/debit", json={
            "account_id": account, "tokens": tokens, "agent": agent, "model": model},
            headers={"Idempotency-Key": uuid.uuid4().hex})
        assert r.status_code == 200 and r.json()["allowed"], r.text

    def redeem(self, code: str) -> str:
        self.page.fill("#promo-code", code)
        self.page.press("#promo-code", "Enter")
        msg = self.page.locator("#promo-msg")
        self.expect(msg).not_to_have_text(re.compile("Redeeming"))
        return str(msg.inner_text())

    def history_rows(self) -> list[list[str]]:
        rows = self.page.locator("#history-table tbody tr")
        return [[c.strip() for c in r.locator("td").all_inner_texts()] for r in rows.all()]

    def wait_bar(self, chart: str, key: str, value: int) -> None:
        """Until the chart's bar `key` shows `value` (the charts follow the ledger, a moment behind)."""
        self.expect(self.page.locator(f'#{chart} rect.bar[data-key="{key}"]')).to_have_attribute(
            "data-value", str(value))

    def bars(self, chart: str) -> dict[str, int]:
        rects = self.page.locator(f"#{chart} rect.bar")
        return {str(r.get_attribute("data-key")): int(r.get_attribute("data-value") or 0) for r in rects.all()}

    @staticmethod
    def expect(locator: Any) -> Any:
        from playwright.sync_api import expect

        return expect(locator)


def test_dashboard_in_a_real_browser(browser: Any, service: Service, artifacts: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    from playwright.sync_api import expect

    expect.set_options(timeout=STEP_TIMEOUT_MS)
    s = Steps(page, service, artifacts)
    elsewhere: list[str] = []  # requests to any other origin: the page must work offline
    page.on("request", lambda r: None if r.url.startswith(service.url) or r.url.startswith("data:")
            else elsewhere.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text
            and "ERR_CONNECTION_REFUSED" not in m.text else None)
    try:
        _flow(s, expect)
    finally:
        context.close()
    assert not elsewhere, f"the page fetched from another origin: {elsewhere}"
    assert not errors, f"errors in the page: {errors}"
    assert len(s.shots) >= 10 and all(p.stat().st_size > 10_000 for p in s.shots)


def _flow(s: Steps, expect: Any) -> None:
    page, service = s.page, s.service
    # -- signed out: the forms; a weak password is refused with the API's reason -----------------
    response = page.goto(service.url + "/")
    assert response is not None and "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.get_by_role("heading", name="Your tokens, live")).to_be_visible()
    email = f"dash-{uuid.uuid4().hex[:8]}@example.com"
    page.get_by_label("Email").nth(1).fill(email)
    page.fill("#register-password", "short")
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("#register-msg")).to_contain_text("at least 10 characters")
    s.shot("signed-out")

    # -- register: the free plan's 10,000, live; the banner: a run needs 20,000 ------------------
    page.fill("#register-password", PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.locator("#remaining")).to_have_text("10,000")
    expect(page.locator("#live-state")).to_have_text("Live")
    assert (s.text("#plan"), s.text("#monthly-allowance"), s.text("#daily-limit")) == ("free", "10,000", "100")
    expect(page.locator("#out-of-tokens")).to_be_visible()
    expect(page.locator("#oot-text")).to_have_text(
        "A run needs about 20,000 tokens and you have 10,000: 10,000 short.")
    session = page.evaluate("JSON.parse(sessionStorage.getItem('tm.session'))")
    account, token = session["user"], session["token"]
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []  # the token: this tab only
    s.shot("registered")

    # -- a debit through the meter API shows within 2 s, without a reload -------------------------
    page.evaluate("window.__sameDocument = true")
    started = time.monotonic()
    s.debit(account, 2_000, "code", "sonnet")
    expect(page.locator("#remaining")).to_have_text("8,000", timeout=LIVE_WITHIN_MS)
    assert time.monotonic() - started < LIVE_WITHIN_MS / 1000
    assert page.evaluate("window.__sameDocument") is True  # no reload happened
    assert (s.text("#requests-today"), s.text("#monthly-used"), s.text("#monthly-remaining")) == ("1", "2,000", "8,000")
    assert page.locator("#monthly-gauge").get_attribute("aria-valuenow") == "2000"
    expect(page.locator("#oot-text")).to_contain_text("12,000 short")
    s.shot("live-debit")

    # -- WELCOME2024 with the keyboard only: Tab to the nav's link, Enter, Tab, type, Enter --------
    page.locator("#balance-title").focus()
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Promo code":
            break
    assert page.evaluate("document.activeElement.getAttribute('href')") == "#promo"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "promo-code"
    page.keyboard.type("welcome2024")
    page.keyboard.press("Enter")
    expect(page.locator("#promo-msg")).to_have_text(
        "WELCOME2024 redeemed: +10,000 bonus tokens. New balance: 18,000 tokens.")
    expect(page.locator("#bonus")).to_have_text("10,000")
    expect(page.locator("#remaining")).to_have_text("18,000")
    s.shot("promo-redeemed")

    # -- each refusal its own message: invalid, expired, already used, then throttled --------------
    expired = f"OLD{uuid.uuid4().hex[:8]}".upper()
    r = service.call("POST", "/api/v1/admin/promo-codes", json={
        "code": expired, "bonus_tokens": 5_000, "starts_at": "2020-01-01T00:00:00Z", "ends_at": "2020-02-01T00:00:00Z"})
    assert r.status_code == 201, r.text
    assert s.redeem("NOSUCHCODE") == "NOSUCHCODE is not a valid promo code. Check the spelling."
    assert s.redeem(expired) == f"{expired} has expired (or is not valid yet)."
    today = datetime.now(UTC).date().isoformat()
    assert s.redeem("WELCOME2024") == f"You have already redeemed WELCOME2024 (on {today})."
    assert s.redeem("LAUNCH50") == "Too many failed attempts. Try again in 15 minutes."
    assert page.locator("#promo-code").get_attribute("aria-invalid") == "true"
    expect(page.locator("#remaining")).to_have_text("18,000")
    s.shot("promo-refusals")

    # -- the starter pack through the test provider: a wrong secret, a decline, then paid ---------
    page.get_by_role("button", name="Buy Starter Pack").click()
    expect(page.locator("#checkout-summary")).to_contain_text("Starter Pack: ₹99.00 (order order_test_")
    page.fill("#test-secret", "not-the-secret")
    page.get_by_role("button", name="Pay (test)").click()
    expect(page.locator("#checkout-msg")).to_have_text(
        "That is not the test payments secret: the payment was not completed.")
    page.fill("#test-secret", TEST_PAYMENT_SECRET)
    page.get_by_role("button", name="Decline payment (test)").click()
    expect(page.locator("#checkout-msg")).to_have_text(
        "Payment failed: the payment was declined. No tokens were added and nothing was charged. You can try again.")
    assert "error" in (page.locator("#checkout-msg").get_attribute("class") or "")
    expect(page.locator("#checkout-summary")).to_contain_text(", failed).")
    expect(page.locator("#remaining")).to_have_text("18,000")
    s.shot("payment-declined")
    page.get_by_role("button", name="Pay (test)").click()
    expect(page.locator("#checkout-msg")).to_have_text(
        "Paid ₹99.00: 50,000 tokens added. New balance: 68,000 tokens.")
    expect(page.locator("#checkout-summary")).to_contain_text(", paid).")
    expect(page.locator("#premium")).to_have_text("50,000")
    expect(page.locator("#remaining")).to_have_text("68,000")
    expect(page.locator("#out-of-tokens")).to_be_hidden()
    purchases = service.call("GET", "/api/v1/tokens/purchases", key=token).json()
    assert [p["status"] for p in purchases] == ["paid"]

    # -- history and charts show the rows (the ledger catches up without a reload) ----------------
    expect(page.locator("#history-table tbody tr").first).to_contain_text("purchase")
    s.wait_bar("chart-agents", "code", 2_000)
    rows = s.history_rows()
    assert [r[1:] for r in rows] == [["purchase", "+50,000", "68,000", "", ""], ["bonus", "+10,000", "18,000", "", ""],
                                     ["usage", "-2,000", "8,000", "code", "sonnet"],
                                     ["allowance", "+10,000", "10,000", "", ""]]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", r[0]) for r in rows), rows
    days = s.bars("chart-days")
    assert len(days) == 30 and days[today] == 2_000 and sum(days.values()) == 2_000
    assert s.bars("chart-agents") == {"code": 2_000} and s.bars("chart-models") == {"sonnet": 2_000}
    analytics = service.call("GET", "/api/v1/tokens/analytics", key=token).json()
    cost = analytics["estimated_cost"]
    assert cost["inr_paise"] > 0 and cost["usd_micros"] > 0
    expect(page.locator("#cost")).to_have_text(_inr(cost["inr_paise"]))
    page.get_by_text("USD", exact=True).click()
    expect(page.locator("#cost")).to_have_text(_usd(cost["usd_micros"]))
    assert s.text("#request-count") == "1 request"
    desktop = s.shot("bought-history-charts")

    # -- ten more debits: two pages of history, filters, the charts by agent and model, the banner
    for agent, model in DEBITS:
        s.debit(account, 5_000, agent, model)
    expect(page.locator("#remaining")).to_have_text("18,000")
    expect(page.locator("#out-of-tokens")).to_be_visible()
    expect(page.locator("#oot-text")).to_have_text("A run needs about 20,000 tokens and you have 18,000: 2,000 short.")
    assert page.locator("#oot-link").get_attribute("href") == "#buy"
    # the newest row is the last debit (balance after 18,000), and the charts hold all ten
    expect(page.locator("#history-table tbody tr").first.locator("td").nth(3)).to_have_text("18,000")
    s.wait_bar("chart-days", today, 52_000)
    rows = s.history_rows()
    assert len(rows) == 10 and [r[1:6] for r in rows[:2]] == [["usage", "-5,000", "18,000", "viva", "haiku"],
                                                              ["usage", "-5,000", "23,000", "code", "sonnet"]]
    assert s.bars("chart-agents") == {"code": 12_000, "idea": 10_000, "uml": 10_000, "report": 10_000, "viva": 10_000}
    assert s.bars("chart-models") == {"haiku": 30_000, "sonnet": 22_000}
    assert s.bars("chart-days")[today] == 52_000
    s.shot("out-of-tokens-banner")
    expect(page.locator("#page-newer")).to_be_disabled()
    page.get_by_role("button", name="Older").click()
    expect(page.locator("#page-label")).to_have_text("Page 2")
    assert [r[1] for r in s.history_rows()] == ["purchase", "bonus", "usage", "allowance"]
    expect(page.locator("#page-older")).to_be_disabled()
    page.get_by_role("button", name="Newer").click()
    expect(page.locator("#page-label")).to_have_text("Page 1")
    page.select_option("#f-type", "purchase")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#history-table tbody tr")).to_have_count(1)
    assert s.history_rows()[0][1:4] == ["purchase", "+50,000", "68,000"]
    page.select_option("#f-type", "usage")
    page.fill("#f-agent", "code")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#history-table tbody tr")).to_have_count(3)
    assert [r[2] for r in s.history_rows()] == ["-5,000", "-5,000", "-2,000"]
    page.fill("#f-since", "2020-01-01")
    page.fill("#f-until", "2020-01-31")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#history-empty")).to_be_visible()
    s.shot("history-filtered")

    # -- the server crashes and comes back: the page reconnects by itself --------------------------
    service.kill()
    expect(page.locator("#live-state")).to_have_text("Reconnecting…")
    service.start()
    expect(page.locator("#live-state")).to_have_text("Live", timeout=20_000)
    started = time.monotonic()
    s.debit(account, 1_000, "ppt", "haiku")
    expect(page.locator("#remaining")).to_have_text("17,000", timeout=LIVE_WITHIN_MS)
    assert time.monotonic() - started < LIVE_WITHIN_MS / 1000
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#page-msg")).to_have_text("")  # a load that failed during the outage is redone

    # -- accessible: every field labelled, AA contrast of the text that carries meaning -----------
    assert page.evaluate(UNLABELLED_JS) == []
    selectors = ["#remaining", ".hint", "#live-state", "#oot-text", "#oot-link", "nav a", ".buckets dt",
                 "th", "#promo-msg", "#checkout-msg", "button[data-pack=starter]", "button.quiet:not(:disabled)",
                 ".toggle input:checked + label", ".toggle input:not(:checked) + label", "#page-label"]
    for sel, fg, bg in page.evaluate(COLOURS_JS, selectors):
        assert fg is not None, f"{sel} not on the page"
        assert _contrast(fg, bg) >= 4.5, f"{sel}: {fg} on {bg} is {_contrast(fg, bg):.2f}:1, under AA's 4.5:1"

    # -- a phone: one column, nothing wider than the screen ---------------------------------------
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    # the charts are redrawn at the phone's width (their labels stay 11 px), under 390 px wide
    expect(page.locator("#chart-days svg")).to_have_attribute("viewBox", re.compile(r"^0 0 (2\d\d|3[0-8]\d)(\.\d+)? "))
    s.shot("phone")

    # -- sign out; a wrong password is refused; signing in again shows the live balance -----------
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#signed-in")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('tm.session')") is None
    assert s.text("#remaining") == "\u2013" and page.locator("#history-table tbody tr").count() == 0  # nothing kept
    page.set_viewport_size({"width": 1280, "height": 900})
    page.fill("#login-email", email)
    page.fill("#login-password", "not-the-password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-msg")).to_have_text("Wrong email or password.")
    page.fill("#login-password", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signed-in")).to_be_visible()
    expect(page.locator("#remaining")).to_have_text("17,000")
    expect(page.locator("#live-state")).to_have_text("Live")
    expect(page.locator("#history-table tbody tr")).to_have_count(10)
    s.shot("signed-in-again")

    if os.environ.get("TOKENMETER_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(desktop, ROOT / "docs" / "img" / "dashboard.png")
