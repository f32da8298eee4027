// The REST API as the page uses it: same origin, the session cookie, and
// the CSRF token on every state-changing request.

// APIError is a failed request: the envelope's code, message, details and
// requestId, and the HTTP status.
export class APIError extends Error {
  constructor(status, body, retryAfter) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.code = (body && body.code) || "internal";
    this.details = (body && body.details) || {};
    this.requestId = body && body.requestId;
    this.retryAfter = retryAfter;
  }
}

// csrfToken reads the token the server set at sign-in.
export function csrfToken() {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === "copelf_csrf") return decodeURIComponent(v.join("="));
  }
  return "";
}

// api makes a request and answers the decoded JSON body (null for 204).
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrfToken();
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  let data = null;
  if (res.status !== 204) {
    try { data = await res.json(); } catch { data = null; }
  }
  if (!res.ok) throw new APIError(res.status, data, Number(res.headers.get("Retry-After")) || 0);
  return data;
}

export const get = (path) => api("GET", path);
export const post = (path, body) => api("POST", path, body);

// list follows a list's cursor up to max items.
export async function list(path, max = 500) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await get(path + sep + "limit=" + Math.min(max, 500) + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    items.push(...(page.items || []));
    cursor = page.nextCursor;
  } while (cursor && items.length < max);
  return items;
}
