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
    shards: int = Field(default=64, ge=1, le=16384, description="journal shards; fixed at deploy")
    key_prefix: str = Field(default="tm", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    redis_timeout_ms: int = Field(default=100, ge=10, le=60_000,
                                  description="Redis silent this long: 503 (the 100 ms fail-closed target)")
    redis_connect_timeout_ms: int = Field(default=100, ge=10, le=60_000)
    max_body_bytes: int = Field(default=65_536, ge=1_024, le=64 * 1024 * 1024,
                                description="request bodies over this are refused with 413 before they are "
                                            "read in full (every route; the debit keeps its 16 KiB cap)")
    hold_ttl_ms: int = Field(default=300_000, ge=1, le=86_400_000)
    flusher: str = Field(default="inprocess", pattern="^(inprocess|external)$",
                         description="inprocess: the service flushes; external: `tokenmeter flusher` does")
    flusher_batch: int = Field(default=8_000, ge=1, le=100_000,
                               description="journal entries per database transaction")
    flusher_block_ms: int = Field(default=200, ge=1, le=60_000)
    flusher_claim_idle_ms: int = Field(default=30_000, ge=100)
    flusher_max_deliveries: int = Field(default=5, ge=1)

    jwt_secret: str | None = Field(
        default=None, description="HS256 secret for user tokens; unset = random per start (dev only)")
    jwt_ttl_s: int = Field(default=86_400, ge=60)
    master_key: str | None = Field(
        default=None, description="bootstrap service key with meter+admin scopes (TOKENMETER_MASTER_KEY)")
    api_key_cache_s: float = Field(default=5.0, ge=0, le=300,
                                   description="verified API keys are cached this long; revocation lag")
    migrate_on_start: bool = True
    promo_max_failures: int = Field(default=5, ge=1, description="failed promo attempts per account per window")
    promo_failure_window_s: int = Field(default=900, ge=1)

    payment_provider: str = Field(default="test", pattern="^(test|razorpay)$",
                                  description="provider of new purchases: test (built in) or razorpay")
    test_payment_secret: str | None = Field(
        default=None, description="HMAC-SHA256 secret of the test provider's signed checkout completion; "
                                  "unset = derived from the JWT secret (random per start in dev)")
    razorpay_key_id: str | None = Field(default=None, description="Razorpay API key id (orders, checkout)")
    razorpay_key_secret: str | None = Field(default=None, description="Razorpay API key secret (orders)")
    razorpay_webhook_secret: str | None = Field(
        default=None, description="shared secret of the Razorpay webhook (X-Razorpay-Signature); unset = "
                                  "the webhook answers 503")
    razorpay_api_url: str = Field(default="https://api.razorpay.com/v1")
    purchase_checkout_ttl_s: int = Field(default=1800, ge=60,
                                         description="a pending purchase expires after this (test checkout "
                                                     "refuses to complete it)")

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url
