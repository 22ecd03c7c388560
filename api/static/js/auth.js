// Sign-in and registration: POST /api/v1/auth/login and /register answer a JWT, kept in this
// tab's sessionStorage only (gone when the tab closes; never in a cookie or localStorage).

import { $, say } from "./dom.js";

const KEY = "tm.session";

export function savedSession() {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY) || "null");
    return s && s.token ? s : null;
  } catch {
    return null;
  }
}

export const forgetSession = () => sessionStorage.removeItem(KEY);

function message(e, action) {
  if (e.status === 401) return "Wrong email or password.";
  if (e.code === "email_taken") return "An account with this email exists: sign in instead.";
  if (e.status === 429) return `Too many attempts. Try again in ${e.retryAfter || 60} seconds.`;
  if (e.status === 422 && e.body.field) {
    const what = e.body.field === "email" ? "Enter a valid email address." : null;
    return what || `Password: ${(e.body.errors && e.body.errors[0].message) || e.message}`;
  }
  return `Could not ${action}: ${e.message}`;
}

/** Wire both forms; onSession({token, email}) after a success. */
export function wireAuthForms(api, onSession) {
  for (const [form, path, action] of [["login", "/api/v1/auth/login", "sign in"],
                                      ["register", "/api/v1/auth/register", "create the account"]]) {
    $(`${form}-form`).addEventListener("submit", async (e) => {
      e.preventDefault();
      const email = $(`${form}-email`).value.trim();
      const password = $(`${form}-password`).value;
      if (!email || !password) return say(`${form}-msg`, "Enter your email and a password.", "error");
      say(`${form}-msg`, "");
      e.submitter && (e.submitter.disabled = true);
      try {
        const { data } = await api.request("POST", path, { body: { email, password }, auth: false });
        const session = { token: data.access_token, email, user: data.user_id };
        sessionStorage.setItem(KEY, JSON.stringify(session));
        $(`${form}-password`).value = "";
        onSession(session);
      } catch (err) {
        say(`${form}-msg`, message(err, action), "error");
      } finally {
        e.submitter && (e.submitter.disabled = false);
      }
    });
  }
}
