// The overview: queue, running runs, pending approvals, agents, batches and
// recent runs, all from the live state.
import { h, runLink, batchLink, since, badge, table, section, when } from "./dom.js";
import { post } from "./api.js";
import { state, TERMINAL, changed } from "./store.js";

const byQueued = (a, b) => (a.queuedAt || "").localeCompare(b.queuedAt || "");
const isOperator = () => state.me && (state.me.role === "operator" || state.me.role === "admin");

export function render() {
  const runs = [...state.runs.values()];
  const queued = runs.filter((r) => r.status === "queued").sort(byQueued);
  const active = runs.filter((r) => r.status === "running" || r.status === "awaiting_approval").sort(byQueued);
  const finished = runs.filter((r) => TERMINAL.has(r.status))
    .sort((a, b) => (b.finishedAt || b.queuedAt || "").localeCompare(a.finishedAt || a.queuedAt || "")).slice(0, 20);
  const approvals = [...state.approvals.values()].filter((a) => a.status === "pending")
    .sort((a, b) => (a.createdAt || "").localeCompare(b.createdAt || ""));
  const agents = [...state.agents.values()];
  const batches = [...state.batches.values()].sort((a, b) => (b.createdAt || "").localeCompare(a.createdAt || "")).slice(0, 20);

  return h("div", { class: "overview" },
    summary(queued, agents),
    section("queued", "Queued", queued.length, queuedTable(queued)),
    section("running", "Running", active.length, runningTable(active)),
    section("approvals", "Waiting for approval", approvals.length, approvalsTable(approvals)),
    section("agents", "Agents online", agents.length, agentsTable(agents)),
    section("batches", "Batches", null, batchesTable(batches)),
    section("recent", "Recently finished", null, recentTable(finished)),
  );
}

function summary(queued, agents) {
  // GET /v1/queue answers {at, total: {depth, oldestQueuedAgeMs, byReason,
  // stuck}, accounts}; without it the page counts the runs it knows.
  // The runs the page holds are live; the queue's figures are read again
  // half a second after a change, so they count only past what the page
  // lists (more than 500 queued runs).
  const q = state.queue && state.queue.total ? state.queue.total : null;
  const all = !q || queued.length < 500;
  const depth = all ? queued.length : q.depth;
  let oldest = queued[0] && queued[0].queuedAt;
  if (!all && state.queue.at) oldest = new Date(Date.parse(state.queue.at) - q.oldestQueuedAgeMs).toISOString();
  const reasons = {};
  if (!all && q.byReason) Object.assign(reasons, q.byReason);
  else for (const r of queued) { const k = (r.queue && r.queue.reason) || "unknown"; reasons[k] = (reasons[k] || 0) + 1; }
  const stuck = q && q.stuck ? Object.entries(q.stuck).filter(([, n]) => n > 0) : [];
  return h("div", { class: "summary", id: "summary" },
    stat("Queued", String(depth), "depth"),
    stat("Oldest queued", depth > 0 && oldest ? since(oldest) : "–", "oldest"),
    Object.entries(reasons).filter(([, n]) => n > 0).map(([k, n]) => stat(k.replace(/_/g, " "), String(n), "reason-" + k)),
    stat("Agents online", String(agents.length), "agents"),
    stuck.map(([k, n]) => stat("stuck " + k.replace(/_/g, " "), String(n), "stuck-" + k, "warn")),
  );
}

function stat(label, v, key, cls) {
  return h("div", { class: "stat " + (cls || ""), dataset: { stat: key } }, h("div", { class: "stat-v" }, v), h("div", { class: "stat-l" }, label));
}

function accountCell(r) {
  return isOperator() ? h("td", { class: "mono" }, r.accountId || "") : null;
}
function accountCol() { return isOperator() ? "Account" : null; }
const cols = (...c) => c.filter(Boolean);

function runRow(r, ...cells) {
  return h("tr", { dataset: { runId: r.id, shownAt: String(state.firstSeen.get(r.id) || "") } }, cells);
}

function queuedTable(runs) {
  return table(cols("Run", "Workflow", accountCol(), "Reason", "Waiting", "Queued at"), runs.map((r) => runRow(r,
    h("td", null, runLink(r.id)),
    h("td", { class: "mono" }, r.workflowId),
    accountCell(r),
    h("td", { class: "reason" }, (r.queue && r.queue.reason) || ""),
    h("td", null, since((r.queue && r.queue.since) || r.queuedAt)),
    h("td", null, when(r.queuedAt)),
  )), "Nothing is queued.");
}

// progress describes a run's steps: done of total and the step running.
export function progress(r) {
  const steps = r.steps || [];
  const done = steps.filter((s) => s.status === "succeeded" || s.status === "failed" || s.status === "skipped").length;
  const cur = steps.find((s) => s.status === "running");
  return { done, total: steps.length, cur };
}

function runningTable(runs) {
  return table(cols("Run", "Workflow", accountCol(), "Status", "Steps", "Agent", "Running for"), runs.map((r) => {
    const p = progress(r);
    return runRow(r,
      h("td", null, runLink(r.id)),
      h("td", { class: "mono" }, r.workflowId),
      accountCell(r),
      h("td", null, badge(r.status), r.cancelRequested ? h("span", { class: "muted" }, " cancelling") : null),
      h("td", { class: "steps" },
        h("progress", { max: String(Math.max(p.total, 1)), value: String(p.done) }),
        h("span", { class: "step-text" }, ` ${p.done}/${p.total}`, p.cur ? ` · step ${p.cur.index} ${p.cur.type}` : "")),
      h("td", { class: "mono" }, r.agentId || ""),
      h("td", null, since(r.startedAt || r.queuedAt)),
    );
  }), "Nothing is running.");
}

function approvalsTable(items) {
  return table(["Message", "Run", "Step", "Waiting", ""], items.map((a) => h("tr", { dataset: { approvalId: a.id } },
    h("td", { class: "message" }, a.message),
    h("td", null, runLink(a.runId)),
    h("td", null, String(a.step)),
    h("td", null, since(a.createdAt)),
    h("td", { class: "actions" }, approvalButtons(a)),
  )), "No approval is waiting.");
}

// approvalButtons resolve an approval from the page (with the CSRF token).
export function approvalButtons(a) {
  const msg = h("span", { class: "error", role: "alert" });
  const act = (approve) => async (ev) => {
    const buttons = ev.target.parentElement.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    msg.textContent = "";
    try {
      const res = await post(`/v1/approvals/${encodeURIComponent(a.id)}/${approve ? "approve" : "reject"}`);
      state.approvals.set(res.id, res);
      changed();
    } catch (e) {
      msg.textContent = `${e.code}: ${e.message}`;
      buttons.forEach((b) => { b.disabled = false; });
    }
  };
  return [
    h("button", { type: "button", class: "approve", onclick: act(true) }, "Approve"),
    h("button", { type: "button", class: "reject", onclick: act(false) }, "Reject"),
    msg,
  ];
}

function agentsTable(items) {
  return table(cols("Agent", "Kind", accountCol(), "Slots free", "Active runs", "Labels", "Connected for", "Last seen"), items.map((a) => h("tr", { dataset: { agentId: a.id } },
    h("td", null, h("strong", null, a.name || a.clientId), h("div", { class: "mono muted" }, a.id)),
    h("td", null, a.kind),
    isOperator() ? h("td", { class: "mono" }, a.accountId) : null,
    h("td", null, `${a.freeSlots ?? "?"} / ${a.slots}`),
    h("td", null, (a.activeRuns || []).map((id) => h("div", null, runLink(id)))),
    h("td", { class: "mono" }, Object.entries(a.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ")),
    h("td", null, since(a.connectedAt)),
    h("td", null, since(a.lastSeenAt)),
  )), "No agent is connected.");
}

// batchProgress: finished iterations of all.
export function batchProgress(b) {
  const c = b.counts || {};
  const done = (c.succeeded || 0) + (c.failed || 0) + (c.timedOut || 0) + (c.cancelled || 0);
  return { done, total: c.total || (b.iterations || []).length };
}

function batchesTable(items) {
  return table(["Batch", "Workflow", "Status", "Progress", "Created"], items.map((b) => {
    const p = batchProgress(b);
    return h("tr", { dataset: { batchId: b.id } },
      h("td", null, batchLink(b.id)),
      h("td", { class: "mono" }, b.workflowId),
      h("td", null, badge(b.status)),
      h("td", null, h("progress", { max: String(Math.max(p.total, 1)), value: String(p.done) }), ` ${p.done}/${p.total}`),
      h("td", null, when(b.createdAt)),
    );
  }), "No batch yet.");
}

function recentTable(runs) {
  return table(["Run", "Workflow", "Status", "Error", "Finished"], runs.map((r) => runRow(r,
    h("td", null, runLink(r.id)),
    h("td", { class: "mono" }, r.workflowId),
    h("td", null, badge(r.status)),
    h("td", null, r.error ? `${r.error.code}${r.error.details && r.error.details.reason ? " · " + r.error.details.reason : ""}` : ""),
    h("td", null, when(r.finishedAt)),
  )), "No run has finished yet.");
}

