// History: GET /api/v1/tokens/transactions, newest first, a page at a time (the X-Next-Cursor
// header), filtered by type, agent and a date range (UTC days, both ends included).

import { $, h, say, setText } from "./dom.js";
import { dayKey, signedTokens, tokens, utcTime } from "./format.js";

const PAGE = 10;

export class History {
  constructor(api) {
    this.api = api;
    this.cursors = [null]; // the cursor of each page seen; [0] = the newest page
    this.page = 0;
    this.next = null;
    this.filters = {};
    this.newestSeq = 0;
    $("history-filters").addEventListener("submit", (e) => {
      e.preventDefault();
      this.applyFilters();
    });
    $("page-older").addEventListener("click", () => this.go(this.page + 1));
    $("page-newer").addEventListener("click", () => this.go(this.page - 1));
  }

  applyFilters() {
    const since = $("f-since").value;
    const until = $("f-until").value;
    if (since && until && since > until) {
      $("f-until").setAttribute("aria-invalid", "true");
      say("history-msg", "The To date is before the From date.", "error");
      return;
    }
    $("f-until").removeAttribute("aria-invalid");
    this.filters = {
      type: $("f-type").value, agent: $("f-agent").value.trim(),
      since: since ? `${since}T00:00:00Z` : "",
      until: until ? `${dayKey(new Date(until + "T00:00:00Z"), 1)}T00:00:00Z` : "", // the day after: inclusive
    };
    this.cursors = [null];
    this.go(0);
  }

  get filtered() {
    return Object.values(this.filters).some(Boolean);
  }

  go(page) {
    this.page = Math.max(page, 0);
    return this.load();
  }

  async load() {
    const q = new URLSearchParams({ limit: String(PAGE) });
    const cursor = this.cursors[this.page];
    if (cursor) q.set("cursor", cursor);
    for (const [k, v] of Object.entries(this.filters)) if (v) q.set(k, v);
    const { data, headers } = await this.api.get(`/api/v1/tokens/transactions?${q}`);
    this.next = headers.get("x-next-cursor");
    this.cursors[this.page + 1] = this.next;
    if (this.page === 0 && !this.filtered && data.length) this.newestSeq = seqOf(data[0].transaction_id);
    this.render(data);
    return data;
  }

  render(rows) {
    $("history-table").tBodies[0].replaceChildren(...rows.map((r) => h("tr", {},
      h("td", {}, utcTime(r.timestamp)),
      h("td", { title: r.description || "" }, r.type),
      h("td", { class: r.tokens > 0 ? "num plus" : "num" }, signedTokens(r.tokens)),
      h("td", { class: "num" }, tokens(r.tokens_after)),
      h("td", {}, r.agent || ""),
      h("td", {}, r.model || ""),
    )));
    $("history-empty").hidden = rows.length > 0;
    $("page-newer").disabled = this.page === 0;
    $("page-older").disabled = !this.next;
    setText("page-label", `Page ${this.page + 1}`);
    say("history-msg", "");
  }
}

/** The journal sequence in a transaction id "<account>:<seq>". */
export function seqOf(transactionId) {
  return Number(String(transactionId).split(":").pop()) || 0;
}
