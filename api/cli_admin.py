"""`tokenmeter apikey` and `tokenmeter admin`: service keys and the admin API's changes from the
command line (api/cli.py declares their arguments)."""

from __future__ import annotations

import argparse
import json
import sys

from api.cli_common import _settings, _with_runtime
from api.runtime import Runtime
from api.settings import Settings

__all__ = ["cmd_admin", "cmd_apikey"]


async def cmd_apikey(args: argparse.Namespace) -> int:
    from api.security import hash_api_key, new_api_key
    from persistence import migrate
    from persistence.db import Database
    from persistence.models import ApiKey, utcnow

    db = Database(_settings(args).database_url)
    try:
        await migrate.upgrade(db)
        async with db.sessions() as session, session.begin():
            if args.action == "create":
                scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
                if not scopes or not set(scopes) <= {"meter", "admin"}:
                    print("--scopes: a comma-separated list of meter, admin", file=sys.stderr)
                    return 2
                key_id, key = new_api_key()
                session.add(ApiKey(id=key_id, name=args.name, key_hash=hash_api_key(key),
                                   scopes=",".join(scopes), created_by="cli"))
                print(f"id: {key_id}\nscopes: {','.join(scopes)}\nkey (shown once, stored hashed): {key}")
            else:
                row = await session.get(ApiKey, args.key_id)
                if row is None:
                    print(f"no API key {args.key_id}", file=sys.stderr)
                    return 1
                row.revoked_at = utcnow()
                print(f"revoked {args.key_id}")
        if args.action == "revoke":
            await _mark_revoked_in_redis(_settings(args), args.key_id)
    finally:
        await db.close()
    return 0


async def _mark_revoked_in_redis(settings: Settings, key_id: str) -> None:
    """The revocation marker every service process checks while its database is down."""
    if settings.embedded_redis:
        return
    from redis.asyncio import Redis

    from api.deps import mark_api_key_revoked

    redis = Redis.from_url(settings.redis_url or "", socket_timeout=2, socket_connect_timeout=2)
    try:
        await mark_api_key_revoked(redis, key_id, prefix=settings.key_prefix, ttl_s=settings.api_key_stale_s)
    except Exception as exc:
        print(f"warning: could not write the revocation marker to Redis ({exc}); the key stops working "
              f"within TOKENMETER_API_KEY_CACHE_S while the database is up", file=sys.stderr)
    finally:
        await redis.aclose()


async def cmd_admin(args: argparse.Namespace) -> int:
    """The admin API's changes from the command line; journaled with actor 'cli' and the reason."""
    from api.routes.plans import change_plan
    from persistence.models import Account, PromoCode

    async def run(rt: Runtime) -> int:
        m, a = rt.meter, args
        if a.action == "grant":
            r = await m.credit(a.account_id, a.tokens, bucket=a.bucket, kind="grant", note=a.reason,
                               reference="admin:cli")
            print(f"granted {r.tokens} -> {r.transaction_id}; remaining {r.remaining}")
        elif a.action == "adjust":
            r = await m.adjust(a.account_id, a.tokens, bucket=a.bucket, kind="adjustment", note=a.reason,
                               reference="admin:cli")
            print(f"took back {r.tokens}, owed {r.uncollected}; remaining {r.remaining}")
        elif a.action == "refund":
            r = await m.credit(a.account_id, a.tokens, bucket="bonus", kind="refund", note=a.reason,
                               reference="admin:cli")
            print(f"refunded {r.tokens} -> {r.transaction_id}; remaining {r.remaining}")
        elif a.action == "set-plan":
            print(json.dumps(await change_plan(m, rt.db, a.account_id, a.plan, f"admin:cli: {a.reason}"), indent=2))
        elif a.action == "promo-create":
            async with rt.db.sessions() as session, session.begin():
                session.add(PromoCode(code=a.code.upper(), bonus_tokens=a.bonus_tokens, max_redemptions=a.max,
                                      plan=a.plan, redemptions=0, active=True))
            print(f"created {a.code.upper()}")
        elif a.action == "promo-disable":
            async with rt.db.sessions() as session, session.begin():
                row = await session.get(PromoCode, a.code.upper())
                if row is None:
                    print(f"no promo code {a.code}", file=sys.stderr)
                    return 1
                row.active = False
            print(f"disabled {a.code.upper()}")
        else:  # accounts
            from sqlalchemy import or_, select

            q = select(Account).order_by(Account.created_at.desc()).limit(a.limit)
            if a.query:
                q = q.where(or_(Account.id.like(f"{a.query}%"), Account.email.like(f"{a.query.lower()}%")))
            async with rt.db.sessions() as session:
                for acct in (await session.execute(q)).scalars():
                    print(f"{acct.id}\t{acct.email or '-'}\t{acct.plan}")
        return 0

    return int(await _with_runtime(args, run))
