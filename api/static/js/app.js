// The dashboard's entry point: sign-in state, the live balance, and when to reload the views
// that read the ledger (history, usage). Those lag the live balance by the flusher's delay, so
// after each change they are reloaded until the history's newest row is that change.

import { Api } from "./api.js";
import { forgetSession, savedSession, wireAuthForms } from "./auth.js";
import { renderBalance, renderBanner } from "./balance.js";
import { Buy } from "./buy.js";
import { $, say, setText } from "./dom.js";
import { History } from "./history.js";
import { followBalance } from "./live.js";
import { Promo } from "./promo.js";
import { Usage } from "./usage.js";

const api = new Api(null, () => signOut("Your session has ended: sign in again."));
const usage = new Usage(api);
const history = new History(api);
const buy = new Buy(api);
new Promo(api);

let stopLive = null;
let estimate = null; // GET /api/v1/projects/estimate: what the next project run needs
let balance = null;
let latestSeq = 0;
let refreshTimer = null;

function report(e) {
  say("page-msg", e && e.message ? `Could not load everything: ${e.message}` : "", e ? "error" : "");
}

function onBalance(b, seq) {
  balance = b;
  renderBalance(b);
  renderBanner(estimate, b.remaining_tokens);
  buy.setPlan(b.plan);
  if (seq > latestSeq) {
    latestSeq = seq;
    scheduleRefresh(600);
  }
}

function onLiveState(state) {
  if (state === "unauthorized") return signOut("Your session has ended: sign in again.");
  const live = $("live-state");
  live.textContent = state === "live" ? "Live" : "Reconnecting…";
  live.classList.toggle("on", state === "live");
}

/** Reload history and usage `delay` ms from now (debounced), and again while the ledger lags. */
function scheduleRefresh(delay, tries = 10) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    try {
      if (history.page === 0) await history.load();
      await usage.load(); // after the history: the charts then hold at least the rows it shows
      report(null);
    } catch (e) {
      report(e);
    }
    const behind = history.page === 0 && !history.filtered && history.newestSeq < latestSeq;
    if (behind && tries > 1 && api.token) scheduleRefresh(1000, tries - 1);
  }, delay);
}

async function signIn(session) {
  api.token = session.token;
  setText("who-email", session.email || "");
  for (const id of ["signed-in", "nav", "who"]) $(id).hidden = false;
  $("signed-out").hidden = true;
  say("session-msg", "");
  stopLive = followBalance(api, onBalance, onLiveState);
  $("balance-title").focus();
  try {
    const [first, est] = await Promise.all([api.get("/api/v1/tokens/balance"), api.get("/api/v1/projects/estimate"),
                                            buy.load(), history.load(), usage.load()]);
    estimate = est.data;
    if (!balance) onBalance(first.data, 0); // the stream had not answered yet
    else renderBanner(estimate, balance.remaining_tokens);
  } catch (e) {
    if (api.token) report(e);
  }
}

/** Forget the token and start the page afresh: nothing of this account stays on it. */
function signOut(message = "") {
  if (stopLive) stopLive();
  stopLive = null;
  api.token = null;
  forgetSession();
  if (message) sessionStorage.setItem("tm.notice", message);
  location.replace(location.pathname); // a fresh page, signed out
}

wireAuthForms(api, signIn);
$("sign-out").addEventListener("click", () => signOut());
const saved = savedSession();
if (saved) {
  signIn(saved);
} else {
  say("session-msg", sessionStorage.getItem("tm.notice") || "", "error");
  sessionStorage.removeItem("tm.notice");
}
