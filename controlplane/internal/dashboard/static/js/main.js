// The dashboard's entry point: sign-in, the router and the render loop.
import { h, tick } from "./dom.js";
import { get, post, api } from "./api.js";
import { state, onChange, changed, start, reset, TERMINAL } from "./store.js";
import * as overview from "./overview.js";
import * as runPage from "./run.js";
import * as batchPage from "./batch.js";

const main = document.getElementById("main");
const live = document.getElementById("live");
const who = document.getElementById("who");
const signout = document.getElementById("signout");

// A Content-Security-Policy violation is a bug of this page: count them
// where tests (and curious people) can see them.
let violations = 0;
document.addEventListener("securitypolicyviolation", (e) => {
  violations++;
  document.body.dataset.cspViolations = String(violations);
  console.error("CSP violation", e.violatedDirective, e.blockedURI);
});

// route is the view the location names.
function route() {
  const p = location.pathname;
  let m;
  if ((m = p.match(/^\/runs\/([^/]+)$/))) return { view: "run", id: decodeURIComponent(m[1]) };
  if ((m = p.match(/^\/batches\/([^/]+)$/))) return { view: "batch", id: decodeURIComponent(m[1]) };
  return { view: "overview" };
}

let current = route();

function render() {
  document.body.dataset.live = state.live;
  live.dataset.state = state.live;
  live.textContent = { sse: "live", connecting: "connecting…", polling: "polling", off: "offline" }[state.live] || state.live;
  if (!state.me) return;
  who.textContent = `${state.me.email} (${state.me.role})`;
  let view;
  if (current.view === "run") view = runPage.render(current.id);
  else if (current.view === "batch") view = batchPage.render(current.id);
  else view = overview.render();
  main.replaceChildren(view);
  document.body.dataset.view = current.view;
}
onChange(render);

// navigate shows another view without reloading the page.
function navigate(href, replace) {
  if (replace) history.replaceState(null, "", href);
  else history.pushState(null, "", href);
  enterRoute();
}

function enterRoute() {
  current = route();
  document.body.dataset.view = current.view;
  if (current.view === "run") runPage.enter(current.id);
  else if (current.view === "batch") batchPage.enter(current.id);
  document.title = current.view === "overview" ? "Copelf" : `Copelf · ${current.id}`;
  changed();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest && ev.target.closest("a[data-link]");
  if (!a || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  ev.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", enterRoute);

// Ages tick every second; a running run's timeline grows with them.
setInterval(() => {
  tick(main);
  if (current.view === "run") {
    const r = state.runs.get(current.id);
    if (r && !TERMINAL.has(r.status) && (r.steps || []).some((s) => s.status === "running")) changed();
  }
}, 1000);

// Sign-in ----------------------------------------------------------------

function showSignIn(message) {
  reset();
  document.body.dataset.view = "signin";
  document.body.dataset.live = "off";
  who.textContent = "";
  signout.hidden = true;
  live.dataset.state = "off";
  live.textContent = "offline";
  const error = h("p", { id: "signin-error", class: "error", role: "alert" }, message || "");
  const email = h("input", { type: "email", name: "email", id: "email", autocomplete: "username", required: true });
  const password = h("input", { type: "password", name: "password", id: "password", autocomplete: "current-password", required: true });
  const button = h("button", { type: "submit", id: "signin-submit" }, "Sign in");
  const form = h("form", { id: "signin", class: "card signin" },
    h("h1", null, "Sign in"),
    h("label", null, "Email", email),
    h("label", null, "Password", password),
    button, error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    error.textContent = "";
    try {
      await post("/v1/sessions", { email: email.value, password: password.value });
      password.value = "";
      await signedIn();
    } catch (e) {
      error.dataset.code = e.code;
      if (e.code === "rate_limited") error.textContent = `Too many sign-in attempts; retry in ${e.retryAfter || e.details.retryAfterSeconds || 1} s.`;
      else if (e.code === "unauthenticated") error.textContent = "The email or password is wrong.";
      else error.textContent = `${e.code}: ${e.message}`;
    } finally {
      button.disabled = false;
    }
  });
  main.replaceChildren(form);
  email.focus();
}

async function signedIn() {
  state.me = await get("/v1/me");
  signout.hidden = false;
  document.body.dataset.ready = "";
  enterRoute();
  await start(() => showSignIn("Your session has ended; sign in again."));
  document.body.dataset.ready = "1";
}

signout.addEventListener("click", async () => {
  try { await api("DELETE", "/v1/sessions/current"); } catch { /* signed out already */ }
  showSignIn("Signed out.");
});

(async function boot() {
  try {
    await signedIn();
  } catch (e) {
    if (e.status === 401) showSignIn();
    else main.replaceChildren(h("p", { class: "error", role: "alert" }, `${e.code || "error"}: ${e.message}`));
  }
})();
