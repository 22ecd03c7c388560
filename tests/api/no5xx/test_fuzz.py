"""Every operation of the schema, fuzzed: schemathesis cases, hand-made junk, bad credentials,
signed payment events, and the deterministic sweep of edge values (see the package's docstring)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.api.no5xx.asgi import Req
from tests.api.no5xx.checks import Findings
from tests.api.no5xx.live import Live
from tests.api.no5xx.schema import auth_kind, operations
from tests.api.no5xx.strategies import (
    AUTH_EXAMPLES,
    EXAMPLES,
    FUZZ,
    JUNK_EXAMPLES,
    bad_credentials,
    both_modes,
    budget,
    case_request,
    good_credentials,
    junk_request,
    payment_event,
    steer,
    swept_requests,
    with_headers,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.operations("all")
def test_schemathesis_cases_never_get_a_5xx(live: Live, label: str) -> None:
    """Positive and negative cases from the schema, mostly authenticated, ids often real."""
    known = live.known
    assert known is not None
    findings = Findings()

    @settings(FUZZ, max_examples=budget(EXAMPLES, live.database))
    @given(case=both_modes(label), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        steer(case, data.draw, live)
        req = case_request(case)
        if req is None:
            return
        refused = False
        if auth_kind(label) != "public":
            if data.draw(st.integers(0, 9), label="auth") < 8:
                creds = data.draw(good_credentials(label, known), label="credentials")
            else:
                creds, refused = data.draw(bad_credentials(label, known), label="bad credentials"), True
            req = with_headers(req, creds)
        findings.check(label, req, live.call(req), refused=refused)

    run()
    findings.assert_none()


@pytest.mark.operations("with_input")
def test_junk_input_never_gets_a_5xx(live: Live, label: str) -> None:
    """Hand-made junk: broken JSON, wrong types, huge numbers, odd strings, headers and paths."""
    known = live.known
    assert known is not None
    findings = Findings()

    @settings(FUZZ, max_examples=budget(JUNK_EXAMPLES, live.database))
    @given(req=junk_request(label, known))
    def run(req: Req) -> None:
        findings.check(label, req, live.call(req))

    run()
    findings.assert_none()


@pytest.mark.operations("protected")
def test_requests_without_valid_credentials_are_refused(live: Live, label: str) -> None:
    """No, wrong, malformed, forged or under-scoped credentials: 401 or 403 with a JSON body,
    whatever the rest of the request holds."""
    known = live.known
    assert known is not None
    findings = Findings()

    @settings(FUZZ, max_examples=budget(AUTH_EXAMPLES, live.database))
    @given(case=operations()[label].as_strategy(GenerationMode.POSITIVE), creds=bad_credentials(label, known))
    def run(case: Any, creds: dict[str, str | None]) -> None:
        req = case_request(case)
        if req is not None:
            req = with_headers(req, creds)
            findings.check(label, req, live.call(req), refused=True)

    run()
    findings.assert_none()


@pytest.mark.operations("payment_ops")
def test_signed_payment_events_never_get_a_5xx(live: Live, label: str) -> None:
    """Payment provider events (the webhook, the test checkout's completion), signed with the
    provider's secret so they reach the handler: bad JSON, unknown orders, wrong amounts and
    currencies, refunds before payment, replays, odd values."""
    known = live.known
    assert known is not None
    assert known.sign is not None, "the app serves payment providers: their events must be fuzzed"
    findings = Findings()

    @settings(FUZZ, max_examples=budget(EXAMPLES, live.database))
    @given(req=payment_event(label, known))
    def run(req: Req) -> None:
        findings.check(label, req, live.call(req))

    run()
    findings.assert_none()



@pytest.mark.operations("with_input")
def test_edge_values_never_get_a_5xx(live: Live, label: str) -> None:
    """Deterministic: every body field, path, query and header parameter through the edge values
    of its type (2**63, 2**64, floats, NaN, surrogates, NUL, 10,000 characters, odd dates...),
    one at a time, the rest of the request valid and authenticated."""
    known = live.known
    assert known is not None
    findings = Findings()
    for req in swept_requests(label, known):
        findings.check(label, req, live.call(req))
    findings.assert_none()


