// The one way the UI talks to the server: the documented /v1 API with the session cookie.
// Every write carries X-Portunus-CSRF: 1 (and a JSON Content-Type when it has a body); the
// browser adds Origin. No token is ever read, stored or put in a URL by this code.
export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && typeof body === "object" && body.error) || {};
    super(err.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || `http_${status}`;
    this.fields = err;
  }
}

const WRITE = new Set(["POST", "PUT", "PATCH", "DELETE"]);
let onAuthProblem = () => {};

// app.js decides what an expired session, a forced password change or onboarding means for navigation
export function setAuthProblemHandler(fn) { onAuthProblem = fn; }

export async function api(method, path, body, { quiet = false } = {}) {
  const headers = { Accept: "application/json" };
  const opts = { method, headers, credentials: "same-origin", cache: "no-store", redirect: "error" };
  if (WRITE.has(method)) headers["X-Portunus-CSRF"] = "1";
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(`/v1/${path}`, opts);
  } catch (e) {
    throw new ApiError(0, { error: { code: "network", message: String(e.message || e) } });
  }
  if (res.status === 204) return null;
  const ctype = res.headers.get("Content-Type") || "";
  const data = ctype.includes("json") ? await res.json().catch(() => null) : await res.text();
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (!quiet) onAuthProblem(err);
    throw err;
  }
  return data;
}

export const get = (path, opts) => api("GET", path, undefined, opts);
export const post = (path, body, opts) => api("POST", path, body, opts);
export const put = (path, body, opts) => api("PUT", path, body, opts);
export const patch = (path, body, opts) => api("PATCH", path, body, opts);
export const del = (path, opts) => api("DELETE", path, undefined, opts);

export function enc(id) { return encodeURIComponent(id); }
