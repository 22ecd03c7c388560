"""The Redis side of `tokenmeter bench`: a private `redis-server` on a free loopback port (no
persistence, so its command statistics and memory hold this run only), counters read from
INFO (commandstats, CPU, memory) before and after a measurement, and `redis-benchmark` of one
script call."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from redis import Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """`redis-server --port N --save '' --appendonly no` for the run; stopped by stop()."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("bench: redis-server not found (Debian package redis-server), or pass --redis-url")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tmbench-redis-"))
        self.cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"bench: the private redis-server did not start: {' '.join(self.cmd)}") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class Counters:
    """What Redis has done so far: per-command calls and µs, CPU seconds, memory."""

    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    cpu_s: float  # used_cpu_user + used_cpu_sys of the server process
    used_memory: int


def counters(redis: Redis) -> Counters:
    stats = redis.info("commandstats")
    commands = {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}
    cpu = redis.info("cpu")
    used = int(redis.info("memory")["used_memory"])
    return Counters(commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), used)


def delta(before: Counters, after: Counters, decisions: int) -> dict[str, float]:
    """Per decision between two readings: EVALSHA µs per call (INFO commandstats' usec_per_call of
    the interval; a script's own commands are inside it), EVALSHA calls and µs per decision, and the
    server's CPU µs per decision (networking included: comparable whatever the commands)."""
    c1, u1 = after.commands.get("evalsha", (0, 0))
    c0, u0 = before.commands.get("evalsha", (0, 0))
    calls, usec, n = c1 - c0, u1 - u0, max(decisions, 1)
    return {"usec_per_call": usec / calls if calls else 0.0, "evalsha_per_decision": calls / n,
            "script_usec_per_decision": usec / n,
            "redis_cpu_usec_per_decision": (after.cpu_s - before.cpu_s) * 1e6 / n}


def redis_benchmark(url: str, command: Sequence[str | int], requests: int, clients: int = 50,
                    pipeline: int = 1) -> dict[str, Any]:
    """`redis-benchmark -c clients -P pipeline` of one command; requests/s and its exact command line."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("bench: redis-benchmark not found (Debian package redis-tools)")
    u = urlparse(url)
    cmd = [exe, "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "-n", str(requests),
           "-c", str(clients), "-P", str(pipeline), "-q", "--csv", *(str(a) for a in command)]
    if u.path not in ("", "/", "/0"):
        cmd[1:1] = ["--dbnum", u.path.strip("/")]
    if u.password:
        cmd[1:1] = ["-a", u.password, "--no-auth-warning"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    rps = re.findall(r'"([0-9.]+)"', out.strip().splitlines()[-1])
    shown = [c if c != u.password else "***" for c in cmd]
    return {"rps": float(rps[0]), "clients": clients, "pipeline": pipeline, "requests": requests,
            "command": " ".join(shown[:14]) + " ..." if len(shown) > 14 else " ".join(shown)}


def delete_prefix(redis: Redis, prefix: str) -> None:
    """Remove every key under `prefix:` (only needed on a Redis the bench did not start)."""
    batch: list[Any] = []
    for key in redis.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            redis.unlink(*batch)
            batch.clear()
    if batch:
        redis.unlink(*batch)
