// Buy: packs and plans from GET /api/v1/tokens/packages. Buying starts a purchase (POST
// /api/v1/tokens/purchase, or /api/v1/plans/subscribe for a plan) and shows its checkout. With the
// built-in test provider the page is that checkout: it signs the completion with the test payments
// secret the operator pasted (HMAC-SHA256 in WebCrypto; the secret never leaves the page) and
// posts it to the provider's URL. The new tokens then arrive through the live balance.

import { $, h, randomId, say, setText } from "./dom.js";
import { inrPaise, tokens, usdCents } from "./format.js";

const START_ERRORS = {
  payment_provider_unavailable: "The payment provider could not create the order. Try again in a moment.",
  period_already_paid: "That month is already paid for.",
};
const PAY_ERRORS = {
  invalid_signature: "That is not the test payments secret: the payment was not completed.",
  order_expired: "This order expired before it was paid. Nothing was charged; start a new purchase.",
  duplicate_event: "This payment was already reported; nothing changed.",
};

async function hmacHex(secret, text) {
  const enc = new TextEncoder();
  const key = await crypto.subtle.importKey("raw", enc.encode(secret), { name: "HMAC", hash: "SHA-256" }, false,
                                            ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, enc.encode(text)));
  return Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
}

const price = (o) => `${inrPaise(o.price_inr_paise)} · ${usdCents(o.price_usd_cents)}`;

export class Buy {
  constructor(api) {
    this.api = api;
    this.purchase = null;
    this.plan = null;
    this.offers = null;
    $("test-pay").addEventListener("submit", (e) => {
      e.preventDefault();
      this.pay(e.submitter && e.submitter.value === "failed" ? "failed" : "paid");
    });
  }

  async load() {
    const { data } = await this.api.get("/api/v1/tokens/packages");
    this.offers = data;
    this.render();
  }

  /** The plan changed (a balance event): redraw the plans' buttons. */
  setPlan(plan) {
    if (plan === this.plan) return;
    this.plan = plan;
    if (this.offers) this.render();
  }

  render() {
    $("packs").replaceChildren(...this.offers.packs.map((p) => h("li", {},
      h("div", { class: "name" }, p.name, ...(p.most_popular ? [h("span", { class: "tag" }, "popular")] : [])),
      h("div", {}, `${tokens(p.tokens)} tokens`),
      h("div", { class: "price" }, price(p)),
      h("button", { type: "button", "data-pack": p.id, onclick: () => this.start("pack", p.id, p.name) },
        `Buy ${p.name}`),
    )));
    $("plans").replaceChildren(...this.offers.plans.map((p) => {
      const current = p.id === this.plan;
      const label = current ? "Your plan" : p.price_inr_paise ? `Subscribe to ${p.name}` : `Move to ${p.name}`;
      return h("li", {},
        h("div", { class: "name" }, p.name),
        h("div", {}, `${tokens(p.monthly_tokens)} tokens a month · ${p.daily_requests ?
          tokens(p.daily_requests) : "unlimited"} requests a day`),
        h("div", { class: "price" }, p.price_inr_paise ? `${price(p)} a month` : "Free"),
        h("button", { type: "button", "data-plan": p.id, disabled: current,
                      onclick: () => this.start("plan", p.id, `${p.name} plan`) }, label));
    }));
  }

  async start(kind, id, name) {
    $("checkout").hidden = false;
    $("test-pay").hidden = true;
    setText("checkout-summary", `${name}: creating the order…`);
    say("checkout-msg", "");
    const key = { "Idempotency-Key": randomId() }; // one purchase per click
    let data;
    try {
      ({ data } = kind === "pack" ? await this.api.post("/api/v1/tokens/purchase", { package_id: id }, key)
        : await this.api.post("/api/v1/plans/subscribe", { plan: id }, key));
    } catch (e) {
      setText("checkout-summary", name);
      say("checkout-msg", START_ERRORS[e.code] || e.message, "error");
      return;
    }
    if (!data.purchase_id) { // the free plan: no payment, it applies at the next period
      setText("checkout-summary", `${name}: no payment needed.`);
      const plan = data.pending_plan || data.plan;
      say("checkout-msg", `You move to the ${plan} plan on ${data.month_reset_date.slice(0, 10)}.`, "ok");
      return;
    }
    this.purchase = { ...data, name };
    this.summary(data.status);
    if (data.provider === "test" && data.checkout) {
      $("test-pay").hidden = false;
      $("test-secret").focus();
    } else {
      say("checkout-msg", `Pay order ${data.order_id} with ${data.provider}; the tokens arrive here when the ` +
                          "provider reports the payment.");
    }
  }

  summary(status) {
    const p = this.purchase;
    setText("checkout-summary", `${p.name}: ${inrPaise(p.amount)} (order ${p.order_id}, ${status}).`);
  }

  async pay(status) {
    const secret = $("test-secret").value;
    if (!secret) return say("checkout-msg", "Enter the test payments secret first.", "error");
    if (!globalThis.crypto || !crypto.subtle) {
      return say("checkout-msg", "Signing needs a secure context: open the page over https or on localhost.", "error");
    }
    const c = this.purchase.checkout;
    const body = JSON.stringify({ ...c.body, status, payment_id: `pay_test_${randomId()}` });
    say("checkout-msg", status === "paid" ? "Paying…" : "Declining…");
    let data;
    try {
      ({ data } = await this.api.request("POST", c.url, {
        body, auth: false, headers: { [c.signature_header]: await hmacHex(secret, body) } }));
    } catch (e) {
      return say("checkout-msg", PAY_ERRORS[e.code] || `The payment was not completed: ${e.message}`, "error");
    }
    if (data.purchase_status) this.summary(data.purchase_status);
    if (data.outcome === "credited") {
      $("test-pay").hidden = true;
      say("checkout-msg", `Paid ${inrPaise(this.purchase.amount)}: ${tokens(data.credited_tokens)} tokens added. ` +
                          `New balance: ${tokens(data.remaining_tokens)} tokens.`, "ok");
    } else if (data.outcome === "plan_applied") {
      $("test-pay").hidden = true;
      say("checkout-msg", `Paid ${inrPaise(this.purchase.amount)}: your plan is updated.`, "ok");
    } else if (data.outcome === "failed") {
      say("checkout-msg", "Payment failed: the payment was declined. No tokens were added and nothing was " +
                          "charged. You can try again.", "error");
    } else {
      say("checkout-msg", data.message || `The purchase is ${data.purchase_status}.`, "error");
    }
  }
}
