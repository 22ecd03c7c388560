// Usage: GET /api/v1/tokens/analytics for the last 30 days: tokens per day, by agent and by model,
// and the estimated cost in INR or USD (a toggle, remembered for the session).

import { barList, dayChart } from "./charts.js";
import { $, setText } from "./dom.js";
import { dayKey, inrPaise, tokens, usdMicros } from "./format.js";

export class Usage {
  constructor(api) {
    this.api = api;
    this.data = null;
    this.currency = sessionStorage.getItem("tm.currency") === "USD" ? "USD" : "INR";
    $(this.currency === "USD" ? "cur-usd" : "cur-inr").checked = true;
    for (const id of ["cur-inr", "cur-usd"]) {
      $(id).addEventListener("change", (e) => {
        this.currency = e.target.value;
        sessionStorage.setItem("tm.currency", this.currency);
        this.renderCost();
      });
    }
    let resized = null;
    window.addEventListener("resize", () => {
      clearTimeout(resized);
      resized = setTimeout(() => this.data && this.render(), 150);
    });
  }

  async load() {
    const since = dayKey(new Date(), -29) + "T00:00:00Z";
    const { data } = await this.api.get(`/api/v1/tokens/analytics?since=${encodeURIComponent(since)}`);
    this.data = data;
    this.render();
    return data;
  }

  renderCost() {
    if (!this.data) return;
    const cost = this.data.estimated_cost;
    setText("cost", this.currency === "USD" ? usdMicros(cost.usd_micros) : inrPaise(cost.inr_paise));
  }

  render() {
    const d = this.data;
    this.renderCost();
    setText("used-total", tokens(d.total_tokens_used));
    setText("request-count", `${tokens(d.usage_requests)} ${d.usage_requests === 1 ? "request" : "requests"}`);
    dayChart($("chart-days"), d.usage_per_day);
    barList($("chart-agents"), d.agent_usage_breakdown);
    barList($("chart-models"), d.model_usage_breakdown);
    const names = $("agent-names");
    names.replaceChildren(...Object.keys(d.agent_usage_breakdown).map((a) => {
      const o = document.createElement("option");
      o.value = a;
      return o;
    }));
  }
}
