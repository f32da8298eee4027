// A batch's page: its progress and each iteration's status, live.
import { h, badge, when, value, table, section, runLink } from "./dom.js";
import { get } from "./api.js";
import { state, changed } from "./store.js";
import { batchProgress } from "./overview.js";

const errors = new Map(); // batch id → error of the last load

export async function enter(id) {
  errors.delete(id);
  try {
    const b = await get("/v1/batches/" + encodeURIComponent(id));
    state.batches.set(b.id, b);
  } catch (e) {
    errors.set(id, e);
  }
  changed();
}

// iterationStatus is an iteration's status, newer from its run when the
// page has seen the run change since the batch did.
function iterationStatus(it) {
  const r = it.runId && state.runs.get(it.runId);
  return r ? r.status : it.status;
}

export function render(id) {
  const err = errors.get(id);
  const b = state.batches.get(id);
  if (err && !b) {
    return h("div", { class: "page", id: "batch-page" },
      h("h1", null, "Batch ", h("span", { class: "mono" }, id)),
      h("p", { class: "error", role: "alert", dataset: { code: err.code } },
        err.status === 403 ? "This batch belongs to another account." :
          err.status === 404 ? "There is no such batch." : `${err.code}: ${err.message}`));
  }
  if (!b) return h("p", { class: "muted" }, "Loading…");
  const its = b.iterations || [];
  const statuses = its.map(iterationStatus);
  const counts = {};
  for (const s of statuses) counts[s] = (counts[s] || 0) + 1;
  const p = batchProgress(b);
  const done = Math.max(p.done, statuses.filter((s) => ["succeeded", "failed", "timed_out", "cancelled"].includes(s)).length);
  return h("div", { class: "page", id: "batch-page", dataset: { batchId: b.id, status: b.status } },
    h("h1", null, "Batch ", h("span", { class: "mono" }, b.id), " ", badge(b.status)),
    h("div", { class: "batch-progress" },
      h("progress", { id: "batch-bar", max: String(Math.max(its.length, 1)), value: String(done) }),
      h("span", { id: "batch-done" }, ` ${done} of ${its.length} done`)),
    h("p", { class: "counts" }, Object.entries(counts).map(([s, n]) => h("span", { class: "count-item" }, badge(s), ` ${n} `))),
    h("dl", { class: "facts" },
      [h("dt", null, "Workflow"), h("dd", { class: "mono" }, b.workflowId)],
      [h("dt", null, "Concurrency"), h("dd", null, String(b.concurrency))],
      [h("dt", null, "Stop on failure"), h("dd", null, b.stopOnFailure ? "yes" : "no")],
      [h("dt", null, "Created"), h("dd", null, when(b.createdAt))],
      [h("dt", null, "Started"), h("dd", null, when(b.startedAt))],
      [h("dt", null, "Finished"), h("dd", null, when(b.finishedAt))],
    ),
    section("iterations", "Iterations", its.length,
      table(["#", "Status", "Run", "Inputs"], its.map((it, i) => h("tr", { dataset: { index: String(it.index), status: statuses[i] } },
        h("td", null, String(it.index)),
        h("td", null, badge(statuses[i])),
        h("td", null, it.runId ? runLink(it.runId) : h("span", { class: "muted" }, "–")),
        h("td", { class: "mono" }, value(it.inputs)),
      )), "No iterations.")),
  );
}
