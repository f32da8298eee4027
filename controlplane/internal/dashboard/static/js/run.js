// A run's page: its state, steps drawn as a timeline, outputs, error,
// approvals and screenshots. It follows the live state; the artifacts are
// read again whenever the run changes.
import { h, since, badge, when, duration, value, table, section, batchLink } from "./dom.js";
import { get, post, list } from "./api.js";
import { state, upsertRun, changed, TERMINAL } from "./store.js";
import { approvalButtons, progress } from "./overview.js";

const pages = new Map(); // run id → {error, artifacts, fingerprint, loading}

// enter loads the run (GET /v1/runs/{id}) when the page opens.
export async function enter(id) {
  const p = { error: null, artifacts: null, fingerprint: "" };
  pages.set(id, p);
  try {
    upsertRun(await get("/v1/runs/" + encodeURIComponent(id)));
  } catch (e) {
    p.error = e;
  }
  changed();
}

// fingerprint changes whenever a step or the status does: the cue to read
// the artifacts again (a screenshot step may have uploaded one).
function fingerprint(r) {
  return r.status + "|" + (r.steps || []).map((s) => s.status).join(",");
}

async function loadArtifacts(id, p) {
  try {
    p.artifacts = await list("/v1/runs/" + encodeURIComponent(id) + "/artifacts");
  } catch (e) {
    p.artifacts = [];
  }
  changed();
}

export function render(id) {
  const p = pages.get(id) || { error: null };
  const r = state.runs.get(id);
  if (p.error && !r) {
    return h("div", { class: "page", id: "run-page" },
      h("h1", null, "Run ", h("span", { class: "mono" }, id)),
      h("p", { class: "error", role: "alert", dataset: { code: p.error.code } },
        p.error.status === 403 ? "This run belongs to another account." :
          p.error.status === 404 ? "There is no such run." : `${p.error.code}: ${p.error.message}`));
  }
  if (!r) return h("p", { class: "muted" }, "Loading…");
  const fp = fingerprint(r);
  if (fp !== p.fingerprint) {
    p.fingerprint = fp;
    loadArtifacts(id, p);
  }
  const pending = [...state.approvals.values()].filter((a) => a.runId === id && a.status === "pending");
  const prog = progress(r);
  return h("div", { class: "page", id: "run-page", dataset: { runId: r.id, status: r.status } },
    h("h1", null, "Run ", h("span", { class: "mono" }, r.id), " ", badge(r.status)),
    h("dl", { class: "facts" },
      fact("Workflow", h("span", { class: "mono" }, r.workflowId)),
      r.batchId ? fact("Batch", batchLink(r.batchId), r.iteration !== undefined ? ` iteration ${r.iteration}` : null) : null,
      r.status === "queued" && r.queue ? fact("Waiting because", h("span", { class: "reason" }, r.queue.reason), " for ", since(r.queue.since)) : null,
      fact("Steps", `${prog.done} of ${prog.total} done`),
      fact("Agent", h("span", { class: "mono" }, r.agentId || "–")),
      fact("Attempt", String(r.attempt)),
      fact("Queued", when(r.queuedAt)),
      fact("Started", when(r.startedAt)),
      fact("Finished", when(r.finishedAt)),
      r.startedAt ? fact("Took", duration((r.finishedAt ? Date.parse(r.finishedAt) : Date.now()) - Date.parse(r.startedAt))) : null,
      fact("Credits", `${r.cost ? r.cost.charged : 0} charged, ${r.cost ? r.cost.reserved : 0} reserved`),
    ),
    TERMINAL.has(r.status) ? null : cancelButton(r),
    r.error ? section("run-error", "Error", null, errorBox(r.error, r.steps)) : null,
    pending.length ? section("run-approvals", "Waiting for approval", pending.length,
      pending.map((a) => h("div", { class: "approval", dataset: { approvalId: a.id } },
        h("p", { class: "message" }, a.message), h("p", { class: "muted" }, `step ${a.step}, waiting `, since(a.createdAt)), approvalButtons(a)))) : null,
    section("timeline", "Steps", null, timeline(r)),
    section("outputs", "Outputs", null, kv(r.outputs, "No outputs.")),
    section("inputs", "Inputs", null, kv(r.inputs, "No inputs.")),
    section("artifacts", "Screenshots and files", p.artifacts ? p.artifacts.length : null, artifacts(r, p.artifacts)),
  );
}

function fact(label, ...v) {
  return [h("dt", null, label), h("dd", null, v)];
}

function cancelButton(r) {
  const msg = h("span", { class: "error", role: "alert" });
  return h("p", null,
    h("button", {
      type: "button", class: "cancel", disabled: r.cancelRequested || null, onclick: async (ev) => {
        ev.target.disabled = true;
        try {
          upsertRun(await post("/v1/runs/" + encodeURIComponent(r.id) + "/cancel"));
          changed();
        } catch (e) {
          msg.textContent = `${e.code}: ${e.message}`;
          ev.target.disabled = false;
        }
      },
    }, r.cancelRequested ? "Cancelling…" : "Cancel run"), " ", msg);
}

function errorBox(err, steps) {
  const d = err.details || {};
  return h("div", { class: "errorbox", dataset: { code: err.code, reason: d.reason || "" } },
    h("p", null, h("strong", null, err.code), d.reason ? ` · ${d.reason}` : "", d.step !== undefined ? ` · step ${d.step}${steps && steps[d.step] ? " (" + steps[d.step].type + ")" : ""}` : ""),
    h("p", null, err.message));
}

// timeline draws one bar per step: its left edge when the step started and
// its width how long it took, on the run's own time scale. A running step
// grows until it ends; a failed step is red and says why.
function timeline(r) {
  const steps = r.steps || [];
  if (steps.length === 0) return h("p", { class: "muted" }, "No steps.");
  const now = Date.now();
  const t0 = r.startedAt ? Date.parse(r.startedAt) : Math.min(...steps.filter((s) => s.startedAt).map((s) => Date.parse(s.startedAt)), now);
  const spans = steps.map((s) => {
    if (!s.startedAt) return null;
    const start = Date.parse(s.startedAt) - t0;
    const dur = s.durationMs ?? (s.status === "running" ? now - Date.parse(s.startedAt) : 0);
    return { start: Math.max(0, start), dur: Math.max(0, dur) };
  });
  const end = r.finishedAt ? Date.parse(r.finishedAt) - t0 : now - t0;
  const total = Math.max(1, end, ...spans.filter(Boolean).map((x) => x.start + x.dur));
  return h("div", { class: "timeline" },
    h("div", { class: "scale muted" }, h("span", null, "0"), h("span", null, duration(total))),
    steps.map((s, i) => {
      const sp = spans[i];
      const bar = h("div", { class: "bar s-" + s.status, title: `${s.type}: ${s.status}${sp ? ", " + duration(sp.dur) : ""}` });
      if (sp) {
        bar.style.left = (100 * sp.start / total).toFixed(3) + "%";
        bar.style.width = Math.max(0.4, 100 * sp.dur / total).toFixed(3) + "%";
      } else {
        bar.hidden = true;
      }
      return h("div", { class: "step", dataset: { index: String(s.index ?? i), status: s.status } },
        h("div", { class: "step-label" }, h("span", { class: "mono" }, "#" + (s.index ?? i)), " ", s.type,
          s.status === "failed" ? h("span", { class: "failed-mark", title: "failed" }, " ✗ failed") : null),
        h("div", { class: "track" }, bar),
        h("div", { class: "step-meta" }, badge(s.status), " ", sp ? duration(sp.dur) : "",
          s.attempts > 1 ? ` · ${s.attempts} attempts` : ""),
        s.error ? h("div", { class: "step-error" }, `${s.error.code}${s.error.details && s.error.details.reason ? " · " + s.error.details.reason : ""}: ${s.error.message}`) : null,
      );
    }));
}

function kv(obj, empty) {
  const entries = Object.entries(obj || {});
  return table(["Name", "Value"], entries.map(([k, v]) => h("tr", { dataset: { key: k } }, h("td", { class: "mono" }, k), h("td", { class: "value" }, value(v)))), empty);
}

function artifacts(r, items) {
  if (items === null || items === undefined) return h("p", { class: "muted" }, "Loading…");
  if (items.length === 0) return h("p", { class: "empty muted" }, "No screenshots or files.");
  const base = "/v1/runs/" + encodeURIComponent(r.id) + "/artifacts/";
  return h("div", { class: "artifacts" }, items.map((a) => {
    const href = base + encodeURIComponent(a.name);
    const img = a.contentType && a.contentType.startsWith("image/") && a.contentType !== "image/svg+xml";
    return h("figure", { class: "artifact", dataset: { name: a.name } },
      img ? h("a", { href, target: "_blank", rel: "noopener" }, h("img", { src: href, alt: a.name, loading: "lazy" })) : null,
      h("figcaption", null, h("a", { href, target: "_blank", rel: "noopener" }, a.name), h("span", { class: "muted" }, ` ${a.contentType}, ${a.size} bytes`)));
  }));
}

