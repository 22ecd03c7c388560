"""Settings from the environment (pydantic-settings). Built by the caller, never at import time."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Every knob of the service. Environment names are given in each field's alias."""

    model_config = SettingsConfigDict(env_prefix="TOKENMETER_", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "TOKENMETER_REDIS_URL"),
        description="redis://host:port/db; unset = embedded in-process Redis (fakeredis with Lua)")
    database_url: str = Field(
        default="sqlite:///tokenmeter.sqlite3",
        validation_alias=AliasChoices("DATABASE_URL", "TOKENMETER_DATABASE_URL"),
        description="postgresql://... (asyncpg) or sqlite:///file (aiosqlite)")
    catalog: str | None = Field(default=None, description="path of a catalog TOML file")
    strict_labels: bool | None = Field(
        default=None, description="true: refuse model/agent labels the catalog does not know (422); false: "
                                  "accept, record, price 0 and flag them `unpriced`; unset: the catalog's own "
                                  "`strict_labels` (false by default)")
    shards: int = Field(default=64, ge=1, le=16384, description="journal shards; fixed at deploy")
    key_prefix: str = Field(default="tm", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    redis_timeout_ms: int = Field(default=100, ge=10, le=60_000,
                                  description="Redis silent this long: 503 (the 100 ms fail-closed target)")
    redis_connect_timeout_ms: int = Field(default=100, ge=10, le=60_000)
    max_body_bytes: int = Field(default=65_536, ge=1_024, le=64 * 1024 * 1024,
                                description="request bodies over this are refused with 413 before they are "
                                            "read in full (every route; the debit keeps its 16 KiB cap)")
    hold_ttl_ms: int = Field(default=300_000, ge=1, le=86_400_000)
    idempotency_ttl_s: int = Field(
        default=86_400, ge=60, le=7 * 86_400,
        description="how long a call's answer is kept for a retry with the same Idempotency-Key; Redis memory "
                    "grows with it (~200 bytes per keyed call held: docs/RELIABILITY.md)")
    gateway_default_tokens: int = Field(
        default=1_000, ge=1, le=1_000_000,
        description="tokens a gateway check asks for when the request has no X-Tokenmeter-Tokens header")
    flusher: str = Field(default="inprocess", pattern="^(inprocess|external)$",
                         description="inprocess: the service flushes; external: `tokenmeter flusher` does")
    flusher_batch: int = Field(default=8_000, ge=1, le=100_000,
                               description="journal entries per database transaction")
    flusher_block_ms: int = Field(default=200, ge=1, le=60_000)
    flusher_claim_idle_ms: int = Field(default=30_000, ge=100)
    flusher_max_deliveries: int = Field(default=5, ge=1)
    flusher_consumer: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="consumer name of `tokenmeter flusher` (--consumer overrides); unset = the host name. "
                    "Keep it the same across restarts: a restart then re-reads its own pending entries at once")
    flusher_consumer_idle_delete_ms: int = Field(
        default=3_600_000, ge=60_000,
        description="a flusher consumer idle this long with no pending entries is removed from the groups")
    flusher_metrics_port: int = Field(default=0, ge=0, le=65535,
                                      description="`tokenmeter flusher` serves Prometheus /metrics here; 0 = off")
    flusher_metrics_host: str = Field(default="127.0.0.1", description="address of the flusher's metrics port")
    background_supervise_s: float = Field(default=1.0, gt=0, le=60,
                                          description="how often the supervisor checks the background tasks")
    background_restart_backoff_s: float = Field(
        default=1.0, gt=0, le=60, description="first delay before a crashed background task is restarted (doubles)")
    background_restart_backoff_max_s: float = Field(default=30.0, gt=0, le=600)
    hold_sweep_s: float = Field(default=5.0, gt=0, le=3600, description="period of the expired-hold sweep")
    reconcile_every_s: float = Field(
        default=0, ge=0, description="run a reconcile (Redis vs ledger) this often in the service; 0 = off")
    reconcile_stale_after_s: float = Field(
        default=60.0, gt=0, description="`tokenmeter reconcile` warns and exits 1 when journal entries older "
                                        "than this are still not in the ledger (a stopped flusher)")

    jwt_secret: str | None = Field(
        default=None, description="HS256 secret for user tokens; unset = random per start (dev only)")
    jwt_ttl_s: int = Field(default=86_400, ge=60)
    master_key: str | None = Field(
        default=None, description="bootstrap service key with meter+admin scopes (TOKENMETER_MASTER_KEY)")
    api_key_cache_s: float = Field(default=5.0, ge=0, le=300,
                                   description="verified API keys are cached this long; revocation lag")
    api_key_stale_s: float = Field(
        default=86_400, ge=0, le=30 * 86_400,
        description="while the database is down, a key verified within this time keeps its last verdict "
                    "(a revocation reaches every process through a Redis marker kept as long)")
    api_key_lookup_timeout_s: float = Field(default=2.0, gt=0, le=60,
                                            description="a key lookup in the database gives up after this")
    readyz_timeout_s: float = Field(default=2.0, gt=0, le=60, description="each /readyz check gives up after this")
    migrate_on_start: bool = True
    promo_max_failures: int = Field(default=5, ge=1, description="failed promo attempts per account per window")
    promo_failure_window_s: int = Field(default=900, ge=1)
    public_promo_max_redemptions: int = Field(
        default=10_000, ge=0, le=2**53,
        description="global cap on redemptions of EACH catalog promo code (WELCOME2024, LAUNCH50, BETA100), "
                    "set on every start; 0 = unlimited")
    hash_threads: int = Field(default=2, ge=1, le=64,
                              description="threads that hash passwords (scrypt), off the event loop")
    register_per_address: int = Field(default=5, ge=1, description="registrations per client address per window")
    register_global: int = Field(default=200, ge=1, description="registrations per window, all addresses")
    register_window_s: int = Field(default=3600, ge=1, description="window of the registration limits")
    login_max_failures: int = Field(default=10, ge=1,
                                    description="failed logins per account, and per address, before a lockout")
    login_failure_window_s: int = Field(default=900, ge=1, description="failed logins are counted this long")
    login_lockout_s: int = Field(default=900, ge=1, description="first lockout; it doubles with each further one")
    login_lockout_max_s: int = Field(default=3600, ge=1, description="longest lockout")
    trusted_proxies: str = Field(
        default="", description="comma-separated IPs/CIDRs of reverse proxies whose X-Forwarded-For is "
                                "believed; empty = the client address is the TCP peer")
    user_check_cache_s: float = Field(default=5.0, ge=0, le=300,
                                      description="a user token's account is known to exist for this long; "
                                                  "a deleted account's tokens stop working within it")
    meter_open_paid_plans: bool = Field(
        default=False, description="meter-scope keys may open accounts on paid plans (else admin scope only)")
    sse_max_streams: int = Field(default=5, ge=1, description="open balance streams per user")

    payment_provider: str = Field(default="test", pattern="^(test|razorpay)$",
                                  description="provider of new purchases: test (built in) or razorpay")
    test_payment_secret: str | None = Field(
        default=None, description="HMAC-SHA256 secret of the test provider's signed checkout completion; "
                                  "unset = random per process, never logged (`tokenmeter serve` makes one per run "
                                  "and prints it in its banner)")
    razorpay_key_id: str | None = Field(default=None, description="Razorpay API key id (orders, checkout)")
    razorpay_key_secret: str | None = Field(default=None, description="Razorpay API key secret (orders)")
    razorpay_webhook_secret: str | None = Field(
        default=None, description="shared secret of the Razorpay webhook (X-Razorpay-Signature); unset = "
                                  "the webhook answers 503")
    razorpay_api_url: str = Field(default="https://api.razorpay.com/v1")
    plan_period_sweep_s: float = Field(
        default=300, ge=1, le=86_400,
        description="how often paid plans are checked against the periods paid for (a plan not renewed is "
                    "scheduled to lapse to free at the period boundary)")
    purchase_checkout_ttl_s: int = Field(default=1800, ge=60,
                                         description="a pending purchase expires after this (test checkout "
                                                     "refuses to complete it)")

    upstream_openai: str | None = Field(
        default=None, description="base URL of an OpenAI-compatible API, as an OpenAI SDK's base_url "
                                  "(https://api.openai.com/v1): mounts the metering proxy at /llm/openai/v1/...")
    upstream_openai_key: str | None = Field(default=None, description="the upstream's API key (sent as Bearer); "
                                                                      "callers never see or send it")
    upstream_anthropic: str | None = Field(
        default=None, description="base URL of the Anthropic API, as the Anthropic SDK's base_url "
                                  "(https://api.anthropic.com): mounts the metering proxy at /llm/anthropic/v1/...")
    upstream_anthropic_key: str | None = Field(default=None, description="the upstream's API key (x-api-key)")
    anthropic_version: str = Field(default="2023-06-01",
                                   description="anthropic-version sent upstream when the caller sends none")
    proxy_passthrough: bool = Field(
        default=False, description="forward other paths of a configured upstream unmetered (e.g. GET /v1/models); "
                                   "off: they answer 404")
    proxy_default_output_tokens: int = Field(
        default=1_024, ge=1, le=1_000_000,
        description="output tokens held for a call that sets no max_tokens (the hold is cut to the plan's "
                    "per-request maximum; the call is charged what the upstream reports either way)")
    proxy_hold_ttl_ms: int = Field(default=1_800_000, ge=1_000, le=86_400_000,
                                   description="how long a proxied call's hold lives (the longest stream)")
    proxy_connect_timeout_s: float = Field(default=10.0, gt=0, le=300,
                                           description="connecting to the upstream gives up after this: 502")
    proxy_read_timeout_s: float = Field(
        default=600.0, gt=0, le=3600, description="the upstream silent this long (before or between chunks): 504, "
                                                  "or the stream is ended")
    proxy_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1_024, le=64 * 1024 * 1024,
                                      description="largest request body the proxy forwards (413 above)")
    proxy_max_connections: int = Field(default=512, ge=1, le=100_000,
                                       description="connections to each upstream, pooled")

    @property
    def proxy_enabled(self) -> bool:
        return bool(self.upstream_openai or self.upstream_anthropic)

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url
