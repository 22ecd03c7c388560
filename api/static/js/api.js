// The service's JSON API, with the user's token. Errors are the API's own bodies
// ({"error", "message", ...}) carried in an ApiError, so each view can map the codes it knows.

export class ApiError extends Error {
  constructor(status, body, headers) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
    this.code = this.body.error || "";
    const retry = headers ? Number(headers.get("retry-after")) : NaN;
    this.retryAfter = Number.isFinite(retry) ? retry : null;
  }
}

export class Api {
  /** `onUnauthorized` runs when the token is refused (expired, or its account deleted). */
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  headers(extra = {}, auth = true) {
    const out = { Accept: "application/json", ...extra };
    if (auth && this.token) out.Authorization = `Bearer ${this.token}`;
    return out;
  }

  /** JSON in, JSON out: {data, headers, status}; throws ApiError (status 0: unreachable). */
  async request(method, path, { body, headers = {}, auth = true } = {}) {
    const init = { method, headers: this.headers(headers, auth), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch {
      throw new ApiError(0, { error: "network", message: "The service cannot be reached; try again." });
    }
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = { error: "bad_response", message: `unexpected answer (HTTP ${res.status})` };
    }
    if (res.status === 401 && auth && this.onUnauthorized) this.onUnauthorized();
    if (!res.ok) throw new ApiError(res.status, data, res.headers);
    return { data, headers: res.headers, status: res.status };
  }

  get(path) {
    return this.request("GET", path);
  }

  post(path, body, headers = {}) {
    return this.request("POST", path, { body, headers });
  }
}
