// The balance card and the out-of-tokens banner, drawn from one balance body (the stream's
// events and GET /api/v1/tokens/balance share the shape).

import { $, setText } from "./dom.js";
import { tokens, utcDay } from "./format.js";

export function renderBalance(b) {
  setText("remaining", tokens(b.remaining_tokens));
  setText("plan", b.plan);
  setText("reset-date", utcDay(b.month_reset_date));
  $("reset-date").setAttribute("datetime", b.month_reset_date + "Z");
  setText("monthly-used", tokens(b.monthly_used));
  setText("monthly-remaining", tokens(b.monthly_remaining));
  setText("monthly-allowance", tokens(b.monthly_allowance));
  const gauge = $("monthly-gauge");
  gauge.setAttribute("aria-valuemax", String(b.monthly_allowance));
  gauge.setAttribute("aria-valuenow", String(b.monthly_used));
  gauge.setAttribute("aria-valuetext", `${tokens(b.monthly_used)} of ${tokens(b.monthly_allowance)} used`);
  gauge.firstElementChild.style.width = `${Math.min(b.monthly_used_percentage, 100)}%`; // CSSOM: CSP allows it
  setText("rollover", tokens(b.rollover_tokens));
  setText("bonus", tokens(b.bonus_tokens));
  setText("premium", tokens(b.premium_tokens));
  setText("held", tokens(b.reserved_tokens));
  setText("requests-today", tokens(b.requests_today));
  setText("daily-limit", b.daily_request_limit ? tokens(b.daily_request_limit) : "unlimited");
}

/** The banner when the balance cannot cover the next project run. `estimate` is the body of
 *  GET /api/v1/projects/estimate (the 402's figures: required, packages_url). */
export function renderBanner(estimate, available) {
  const banner = $("out-of-tokens");
  if (!estimate || available >= estimate.required) {
    banner.hidden = true;
    return;
  }
  const shortage = estimate.required - available;
  setText("oot-text", `A run needs about ${tokens(estimate.required)} tokens and you have ${tokens(available)}: ` +
                      `${tokens(shortage)} short.`);
  banner.dataset.shortage = String(shortage);
  banner.hidden = false;
}
