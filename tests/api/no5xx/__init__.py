"""No input produces a 5xx: property-based fuzzing of every operation in the app's OpenAPI schema.

The guarantee: bad input gets a clear 4xx naming the problem (a JSON body with "error" and
"message", and on a 422 a "field" the request has) and changes nothing. No input produces a 5xx.
A 503 is allowed only when the store is really down, and here it is not.

How it runs: the real app (create_app via running_app, with its lifespan: Redis, the database,
the in-process flusher and the hold sweeper) serves on an event loop in a background thread,
once on SQLite and once on a Postgres database of its own (when Postgres is reachable).
Hypothesis drives it from the test thread through raw ASGI calls, so any bytes and headers can
be sent, an event stream can be cut after its first event, and an exception the app raises is
caught with the project frames it passed through. For every operation in the schema:
  * schemathesis cases, positive and negative, generated from the app's own OpenAPI schema;
  * junk made here: broken JSON, wrong types, 2**64, floats, NaN, lone surrogates, NUL, empty
    and huge strings, missing and extra fields, odd content types, headers and paths;
  * a deterministic sweep: each input in turn through the edge values of its type;
  * requests without valid credentials (none, wrong kind, forged, under-scoped): 401/403;
  * payment events signed with the provider's secret, so they get past the signature check;
  * "changes nothing": Redis and the database are compared around every 4xx.
Most requests authenticate properly (the master service key, a meter-only key, or a registered
user's JWT), so they reach the handlers. Ids are often swapped for real ones (accounts fuzz-1 and
fuzz-2, the user's account, a live hold, the user's project and orders, a key to revoke, real
promo codes, plans, agents and models), so the deeper paths of the handlers run and not only
their 404s.

Failures are collected, not raised mid-run. Each test ends by listing every distinct fault with
its shortest reproduction (method, path, headers, body, and the response or the exception).
The narrow regression tests (test_regressions.py) pin each fault the fuzzing found.

The package: schema.py (the operations, read from the app's OpenAPI schema on first use), asgi.py
(the raw ASGI client), live.py (the app on a loop of its own), checks.py (what every reply must
satisfy), strategies.py (the generators); the tests: test_changes_nothing.py (a rejected request
changes nothing; an app of its own), test_fuzz.py (every operation), test_regressions.py (one per
fault found). On Postgres they use the run's database (tests/conftest.py's pg_database), emptied
before and after; two apps never share it at once: test_changes_nothing.py sorts first, and the
package's live app starts only after its app has stopped.
"""
