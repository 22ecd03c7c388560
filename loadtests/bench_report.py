"""The report of `tokenmeter bench`: the ratios of figures measured in the same run, one table
(text), the JSON and a PNG chart (matplotlib, Agg backend) of the ratios and Redis time per call."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests.bench_core import LIMITS_STRATEGIES

Row = tuple[str, str, float, str]  # section, what, value, unit


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def ratios(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ratio whose two sides were measured in this run: {key: {label, value}}."""
    out: dict[str, dict[str, Any]] = {}

    def add(key: str, label: str, num: Any, den: Any) -> None:
        if isinstance(num, int | float) and isinstance(den, int | float) and den:
            out[key] = {"label": label, "value": num / den}

    g = lambda *p: _get(results, *p)  # noqa: E731
    n = _get(results, "script", "debit_c", "clients")
    c = f"-c {n}" if n else "-c N"
    add("debit_script_vs_trivial_usec", "debit script / trivial script, Redis µs per call",
        g("script", "debit_c", "usec_per_call"), g("script", "trivial_c", "usec_per_call"))
    meter = g("meter", "debit", "rps")
    add("meter_vs_redis_benchmark", f"meter.debit / redis-benchmark {c} (same script)", meter,
        g("script", "debit_c", "rps"))
    add("meter_vs_redis_benchmark_p16", f"meter.debit / redis-benchmark {c} -P 16", meter,
        g("script", "debit_p16", "rps"))
    rates = [g("limits", s, "rps") for s in LIMITS_STRATEGIES]
    for s, r in zip(LIMITS_STRATEGIES, rates, strict=True):
        add(f"meter_vs_limits_{s}", f"meter.debit / limits {s.replace('_', ' ')}", meter, r)
    measured = [r for r in rates if isinstance(r, int | float)]
    if measured:
        add("meter_vs_limits_fastest", "meter.debit / limits' fastest strategy", meter, max(measured))
    for mode in ("inprocess", "external"):
        peak = g("http", mode, "peak") or {}
        debit = _get(peak, "debit", "rps")
        add(f"http_{mode}_vs_asgi", f"HTTP debit / pure-ASGI bare (flusher {mode})", debit, _get(peak, "asgi", "rps"))
        add(f"http_{mode}_vs_fastapi", f"HTTP debit / FastAPI bare (flusher {mode})", debit, _get(peak, "bare", "rps"))
    add("flusher_vs_copy", "flusher rows/s / raw COPY rows/s", g("flusher", "flusher_rows_per_s"),
        g("flusher", "copy_rows_per_s"))
    add("flusher_vs_debits", "flusher rows/s / meter decisions/s making its backlog (256 callers)",
        g("flusher", "flusher_rows_per_s"),
        g("flusher", "backlog_decisions_per_s"))
    one = g("scale", "accounts_1", "rps")
    big = g("scale", "accounts_max")
    add("scale_1k_vs_1", "meter.debit over 1,000 accounts / over 1", g("scale", "accounts_1000", "rps"), one)
    if big:
        add("scale_max_vs_1", f"meter.debit over {big:,} accounts / over 1", g("scale", f"accounts_{big}", "rps"), one)
    add("scale_hot_vs_1", "meter.debit, 90% on 10 hot accounts / over 1", g("scale", "hot", "rps"), one)
    return out


def rows(results: dict[str, Any]) -> Iterator[Row]:
    g = lambda *p: _get(results, *p)  # noqa: E731
    names = {"debit_c": "redis-benchmark -c N, debit script", "debit_p16": "redis-benchmark -c N -P 16, debit script",
             "trivial_c": "redis-benchmark -c N, `return 1`", "trivial_p16": "redis-benchmark -c N -P 16, `return 1`"}
    for key, label in names.items():
        if r := g("script", key):
            yield "script", label.replace("N", str(r["clients"])), r["rps"], "calls/s"
            yield "script", "  Redis µs per call (commandstats)", r["usec_per_call"], "µs"
    if r := g("meter", "debit"):
        yield "meter", f"meter.debit, {r['concurrency']} concurrent callers", r["rps"], "decisions/s"
        yield "meter", "  Redis µs per call (commandstats)", r["usec_per_call"], "µs"
        yield "meter", "  Redis CPU µs per decision (networking included)", r["redis_cpu_usec_per_decision"], "µs"
    for s in LIMITS_STRATEGIES:
        if r := g("limits", s):
            yield "limits", f"limits {s.replace('_', ' ')}", r["rps"], "decisions/s"
            yield "limits", "  Redis µs per call (commandstats)", r["usec_per_call"], "µs"
    for mode in ("inprocess", "external"):
        peak, paced = g("http", mode, "peak"), g("http", mode, "paced")
        if not peak:
            continue
        for route, label in (("debit", "debit"), ("asgi", "bare pure-ASGI"), ("bare", "bare FastAPI"),
                             ("check", "gateway check")):
            if route in peak:
                yield f"http {mode}", f"peak req/s, {label}", peak[route]["rps"], "req/s"
        if paced:
            yield f"http {mode}", f"at 50% load ({paced['target_rps']:,.0f}/s): p50 debit", \
                paced["debit"]["p50_us"] / 1000, "ms"
            yield f"http {mode}", "  p99 debit", paced["debit"]["p99_us"] / 1000, "ms"
            yield f"http {mode}", "  p50 bare FastAPI", paced["bare"]["p50_us"] / 1000, "ms"
            yield f"http {mode}", "  p99 bare FastAPI", paced["bare"]["p99_us"] / 1000, "ms"
            yield f"http {mode}", "  p99 debit - p99 bare FastAPI", \
                (paced["debit"]["p99_us"] - paced["bare"]["p99_us"]) / 1000, "ms"
    if (r := g("flusher")) and "flusher_rows_per_s" in r:
        yield "flusher", f"flusher draining {int(r['rows']):,} entries into PostgreSQL", r["flusher_rows_per_s"], \
            "rows/s"
        yield "flusher", "raw COPY of the same rows, same batches", r["copy_rows_per_s"], "rows/s"
        yield "flusher", f"lag at 50% load ({r['lag_load_per_s']:,.0f} debits/s), max", r["lag_max_ms"], "ms"
    if (r := g("scale")) and "hot" in r:
        for n in (1, 1_000, r["accounts_max"]):
            if s := r.get(f"accounts_{n}"):
                yield "scale", f"meter.debit over {n:,} account{'s' if n > 1 else ''}", s["rps"], "decisions/s"
                yield "scale", "  Redis µs per call (commandstats)", s["usec_per_call"], "µs"
        yield "scale", f"meter.debit, {r['hot']['hot_share']:.0%} on {r['hot']['hot_accounts']} hot accounts", \
            r["hot"]["rps"], "decisions/s"
        yield "scale", "  Redis µs per call (commandstats)", r["hot"]["usec_per_call"], "µs"
        m = r["memory"]
        yield "memory", f"used_memory per account ({int(m['accounts_opened']):,} opened)", \
            m["used_memory_per_account"], "bytes"
        yield "memory", "  of which the keyspace (the rest: the open's journal entry)", m["keyspace_per_account"], \
            "bytes"
        yield "memory", "  MEMORY USAGE of an account's hash", m["account_hash_bytes"], "bytes"
        yield "memory", "journal entry of a debit, until flushed", m["journal_bytes_per_debit"], "bytes"


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def table(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"tokenmeter bench  {meta['started']}  ({meta['machine']})", f"redis: {meta['redis']}", ""]
    body = list(rows(results))
    for section, what, value, unit in body:
        lines.append(f"{section:<16} {what:<58} {_fmt(value):>12} {unit}")
    for name, r in results.items():
        if isinstance(r, dict) and "skipped" in r:
            lines.append(f"{name:<16} skipped: {r['skipped']}")
    rs = ratios(results)
    if rs:
        lines += ["", "ratios, both sides measured in this run:"]
        lines += [f"  {r['label']:<72} {r['value']:>7.2f}" for r in rs.values()]
    return "\n".join(lines) + "\n"


def _barh(ax: Any, title: str, bars: list[tuple[str, float]], fmt: str, parity: bool = False) -> None:
    labels, values = [b[0] for b in bars][::-1], [b[1] for b in bars][::-1]
    ax.barh(labels, values, color="#3b7dd8" if parity else "#d8843b")
    if parity:
        ax.axvline(1.0, color="#444", linewidth=1, linestyle="--")
    for i, v in enumerate(values):
        ax.text(v, i, " " + format(v, fmt), va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    ax.margins(x=0.15)


def chart(results: dict[str, Any], path: Path, title: str) -> str:
    """Bar charts: the throughput ratios, Redis µs per call, decisions/s and HTTP req/s; '' or why
    no chart was drawn."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (in the dev extras): no chart"
    # the script's cost over the trivial one is shown as µs per call (it would dwarf the rest)
    rs = [(r["label"], r["value"]) for k, r in ratios(results).items() if k != "debit_script_vs_trivial_usec"]
    usec = [(f"{s}: {w.strip()}", v) for s, w, v, u in _sub_rows(results, "commandstats")]
    rate = [(f"{s}: {w}", v) for s, w, v, u in rows(results)  # `return 1`: its floor is in µs per call
            if u in ("calls/s", "decisions/s") and "return 1" not in w]
    http = [(f"{s}: {w}", v) for s, w, v, u in rows(results) if u == "req/s"]
    panels = [p for p in ((rs, "ratios measured side by side (1 = parity)", ".2f", True),
                          (usec, "Redis µs per script call (INFO commandstats)", ".1f", False),
                          (rate, "calls or decisions per second, same concurrency", ",.0f", False),
                          (http, "HTTP peak req/s (wrk)", ",.0f", False)) if p[0]]
    if not panels:
        return "nothing measured to chart"
    cols = 2 if len(panels) > 1 else 1
    grid = (len(panels) + 1) // 2 if cols == 2 else 1
    tallest = max(len(p[0]) for p in panels)
    fig, axes = plt.subplots(grid, cols, figsize=(8 * cols, grid * max(3.0, 0.32 * tallest + 1.2)), squeeze=False)
    for ax, (bars, name, fmt, parity) in zip(axes.flat, panels, strict=False):
        _barh(ax, name, bars, fmt, parity)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def _sub_rows(results: dict[str, Any], word: str) -> list[Row]:
    """The indented rows containing `word`, named by the row they belong to."""
    out, last = [], ""
    for section, what, value, unit in rows(results):
        if not what.startswith("  "):
            last = what
        elif word in what:
            out.append((section, last, value, unit))
    return out


def write(out: Path, results: dict[str, Any], meta: dict[str, Any], text: str) -> list[str]:
    """bench.json, bench.txt, bench.png into `out`; the lines to print about them."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "sections": results, "ratios": ratios(results)}
    (out / "bench.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    (out / "bench.txt").write_text(text)
    notes = [f"wrote {out / 'bench.json'} and {out / 'bench.txt'}"]
    why = chart(results, out / "bench.png", f"tokenmeter bench, {meta['started']}, {meta['machine']}")
    notes.append(f"chart: {why}" if why else f"wrote {out / 'bench.png'}")
    return notes
