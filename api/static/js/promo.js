// Promo codes: POST /api/v1/tokens/redeem-code. Each refusal the API names gets its own message.

import { $, say } from "./dom.js";
import { tokens } from "./format.js";

function refusal(e, code) {
  const minutes = (s) => (s >= 90 ? `${Math.ceil(s / 60)} minutes` : `${s} seconds`);
  switch (e.code) {
    case "unknown_code": return `${code} is not a valid promo code. Check the spelling.`;
    case "code_expired": return `${code} has expired (or is not valid yet).`;
    case "code_exhausted": return `${code} has been used up: it reached its limit of redemptions.`;
    case "already_redeemed":
      return `You have already redeemed ${code}` +
             (e.body.redeemed_at ? ` (on ${e.body.redeemed_at.slice(0, 10)}).` : ".");
    case "too_many_attempts":
      return `Too many failed attempts. Try again in ${minutes(e.retryAfter || e.body.retry_after_s || 60)}.`;
    case "code_not_for_plan": return e.message;
    case "invalid_input": return "Enter a promo code.";
    default: return e.message;
  }
}

export class Promo {
  constructor(api) {
    this.api = api;
    $("promo-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.redeem();
    });
  }

  async redeem() {
    const input = $("promo-code");
    const code = input.value.trim().toUpperCase();
    if (!code) {
      input.setAttribute("aria-invalid", "true");
      return say("promo-msg", "Enter a promo code.", "error");
    }
    say("promo-msg", `Redeeming ${code}…`);
    try {
      const { data } = await this.api.post("/api/v1/tokens/redeem-code", { promo_code: code });
      input.removeAttribute("aria-invalid");
      input.value = "";
      say("promo-msg", `${code} redeemed: +${tokens(data.bonus_tokens)} bonus tokens. ` +
                       `New balance: ${tokens(data.new_balance)} tokens.`, "ok");
    } catch (e) {
      input.setAttribute("aria-invalid", "true");
      say("promo-msg", refusal(e, code), "error");
    }
  }
}
