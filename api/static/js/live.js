// The live balance: GET /api/v1/tokens/stream (Server-Sent Events). EventSource cannot send the
// Authorization header the stream requires, so this reads the stream with fetch() and parses the
// SSE frames itself. It reconnects by itself: after an error or a closed stream (backing off from
// 1 s to 15 s, or as long as a 429's Retry-After says), and when nothing, not even the server's
// keep-alive (every 7.5 s), arrived for 20 s: a connection that died without closing.

import { sleep } from "./dom.js";

const SILENCE_MS = 20_000;

/** Parse SSE frames out of `body` (a ReadableStream); onEvent({event, id, data}) for each. */
async function readEvents(body, onEvent, onBytes) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onBytes();
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const ev = { event: "message", id: "", data: [] };
      for (const line of frame.split("\n")) {
        if (!line || line.startsWith(":")) continue; // a comment: the keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") ev.data.push(val);
        else if (field === "event") ev.event = val;
        else if (field === "id") ev.id = val;
      }
      if (ev.data.length) onEvent({ ...ev, data: ev.data.join("\n") });
    }
  }
}

/**
 * Follow the balance: onBalance(balance, seq) for each change; onState("live" | "reconnecting" |
 * "unauthorized") as the connection changes. Returns stop().
 */
export function followBalance(api, onBalance, onState) {
  let stopped = false;
  let controller = null;

  async function run() {
    let backoff = 1000;
    while (!stopped) {
      controller = new AbortController();
      let wait = backoff;
      let timer = null;
      const watchdog = () => {
        clearTimeout(timer);
        timer = setTimeout(() => controller.abort(), SILENCE_MS);
      };
      try {
        watchdog();
        const res = await fetch("/api/v1/tokens/stream", {
          headers: api.headers({ Accept: "text/event-stream" }),
          signal: controller.signal, cache: "no-store",
        });
        if (res.status === 401) {
          clearTimeout(timer);
          onState("unauthorized");
          return;
        }
        if (res.ok && res.body) {
          onState("live");
          backoff = 1000;
          wait = 500;
          await readEvents(res.body, (ev) => {
            if (ev.event === "balance") onBalance(JSON.parse(ev.data), Number(ev.id) || 0);
          }, watchdog);
        } else {
          const retry = Number(res.headers.get("retry-after"));
          if (Number.isFinite(retry) && retry > 0) wait = retry * 1000;
          await res.body?.cancel();
        }
      } catch {
        // aborted by the watchdog, or the network failed: reconnect below
      }
      clearTimeout(timer);
      if (stopped) return;
      onState("reconnecting");
      await sleep(wait);
      backoff = Math.min(backoff * 2, 15_000);
    }
  }

  run();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}
