// DOM helpers. Every value reaches the page as text (textContent, attribute
// values set through the DOM); nothing is ever parsed as HTML.

// h builds an element: h("td", {class: "x"}, "text", child, [more]).
// Props: class, text, dataset (object), on<event> (listener), any other
// key is an attribute (true → present, null/false/undefined → absent).
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else if (c instanceof Node) el.append(c);
    else el.append(document.createTextNode(String(c)));
  }
}

// link is an in-page link handled by the router.
export function link(href, text, props) {
  return h("a", { ...props, href, "data-link": true }, text);
}

// runLink and batchLink link to a resource's page; the id is encoded, so no
// id can make the link point elsewhere.
export const runLink = (id, text) => link("/runs/" + encodeURIComponent(id), text ?? id, { class: "id" });
export const batchLink = (id, text) => link("/batches/" + encodeURIComponent(id), text ?? id, { class: "id" });

// since is an element whose text is the age of an instant, kept current by
// tick().
export function since(iso, props) {
  const el = h("span", { ...props, class: "age", dataset: { since: iso || "" } });
  el.textContent = iso ? age(Date.now() - Date.parse(iso)) : "–";
  return el;
}

// tick updates every since() element under root.
export function tick(root) {
  const now = Date.now();
  for (const el of root.querySelectorAll("[data-since]")) {
    const t = Date.parse(el.dataset.since);
    if (!Number.isNaN(t)) el.textContent = age(now - t);
  }
}

// age: 4 s, 3 min 12 s, 2 h 5 min, 3 d 4 h.
export function age(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + (s % 60) + " s";
  const hrs = Math.floor(m / 60);
  if (hrs < 48) return hrs + " h " + (m % 60) + " min";
  return Math.floor(hrs / 24) + " d " + (hrs % 24) + " h";
}

// duration: 850 ms, 1.2 s, 2 min 5 s.
export function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  return age(ms);
}

// when: a readable local time with the ISO instant as its tooltip.
export function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "–");
  const d = new Date(iso);
  return h("time", { datetime: iso, title: iso }, d.toLocaleString());
}

// badge shows a status.
export function badge(status) {
  return h("span", { class: "badge s-" + String(status).replace(/[^a-z_]/g, ""), dataset: { status } }, String(status).replace(/_/g, " "));
}

// value shows any JSON value as text.
export function value(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}

// table builds a table from column titles and rows (arrays of cells); empty
// shows a line instead when there are no rows.
export function table(cols, rows, empty) {
  if (rows.length === 0) return h("p", { class: "empty muted" }, empty);
  return h("table", null,
    h("thead", null, h("tr", null, cols.map((c) => h("th", null, c)))),
    h("tbody", null, rows));
}

// section is a titled part of a page.
export function section(id, title, count, ...body) {
  return h("section", { id, class: "card" },
    h("h2", null, title, count === null || count === undefined ? null : h("span", { class: "count" }, String(count))),
    body);
}
