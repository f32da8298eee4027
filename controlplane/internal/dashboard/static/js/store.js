// The page's state: what the REST API showed at load, kept current by the
// events of GET /v1/events. Each event carries the whole resource as the
// REST API shows it, so applying one is an upsert.
import { get, list } from "./api.js";

export const TERMINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);
const KEEP_FINISHED = 200; // finished runs kept in memory

export const state = {
  me: null,
  runs: new Map(), // id → run
  approvals: new Map(), // id → approval (every status seen)
  agents: new Map(), // id → agent, connected ones
  batches: new Map(), // id → batch
  queue: null, // GET /v1/queue, when the server has it
  firstSeen: new Map(), // run id → when this page first learnt of it (ms)
  live: "off", // off | connecting | sse | polling
};

const listeners = new Set();
let scheduled = false;

// onChange calls fn (once per burst of changes) after the state changed.
export function onChange(fn) { listeners.add(fn); }

export function changed() {
  if (scheduled) return;
  scheduled = true;
  setTimeout(() => {
    scheduled = false;
    for (const fn of listeners) fn();
  }, 0);
}

export function upsertRun(run) {
  if (!run || !run.id) return;
  if (!state.firstSeen.has(run.id)) state.firstSeen.set(run.id, Date.now());
  state.runs.set(run.id, run);
  if (TERMINAL.has(run.status)) pruneFinished();
}

function pruneFinished() {
  const finished = [...state.runs.values()].filter((r) => TERMINAL.has(r.status));
  if (finished.length <= KEEP_FINISHED) return;
  finished.sort((a, b) => (a.finishedAt || "").localeCompare(b.finishedAt || ""));
  for (const r of finished.slice(0, finished.length - KEEP_FINISHED)) {
    state.runs.delete(r.id);
    state.firstSeen.delete(r.id);
  }
}

// apply applies one event of GET /v1/events.
export function apply(type, resource) {
  switch (type) {
    case "run.updated":
      upsertRun(resource);
      if (resource.batchId && !state.batches.has(resource.batchId)) fetchBatch(resource.batchId);
      break;
    case "batch.updated":
      state.batches.set(resource.id, resource);
      break;
    case "approval.updated":
      state.approvals.set(resource.id, resource);
      break;
    case "agent.connected":
    case "agent.updated":
      state.agents.set(resource.id, resource);
      break;
    case "agent.disconnected":
      state.agents.delete(resource.id);
      break;
    default:
      return;
  }
  if (type === "run.updated" || type === "agent.connected" || type === "agent.disconnected") refreshQueueSoon();
  changed();
}

// fetchBatch reads a batch the page has not seen yet (its runs show up
// before any change of the batch itself).
const fetching = new Set();
async function fetchBatch(id) {
  if (fetching.has(id)) return;
  fetching.add(id);
  try {
    const b = await get("/v1/batches/" + encodeURIComponent(id));
    if (!state.batches.has(b.id)) state.batches.set(b.id, b);
    changed();
  } catch { /* not visible to this user: nothing to show */ } finally {
    fetching.delete(id);
  }
}

// load reads the whole state from the REST API.
export async function load() {
  const [queued, running, awaiting, recent, approvals, agents, batches] = await Promise.all([
    list("/v1/runs?status=queued"),
    list("/v1/runs?status=running"),
    list("/v1/runs?status=awaiting_approval"),
    list("/v1/runs", 25),
    list("/v1/approvals?status=pending"),
    get("/v1/agents").then((r) => r.items || []),
    list("/v1/batches", 25),
  ]);
  // Runs no longer active since the last load are replaced by what the
  // API says now.
  for (const r of [...state.runs.values()]) if (!TERMINAL.has(r.status)) state.runs.delete(r.id);
  for (const r of [...queued, ...running, ...awaiting, ...recent]) upsertRun(r);
  for (const a of [...state.approvals.values()]) if (a.status === "pending") state.approvals.delete(a.id);
  for (const a of approvals) state.approvals.set(a.id, a);
  state.agents = new Map(agents.map((a) => [a.id, a]));
  for (const b of batches) state.batches.set(b.id, b);
  await refreshQueue();
  changed();
}

let queueTimer = null;
let queueMissing = false;

// refreshQueue reads GET /v1/queue; a server without it leaves queue null
// and the page counts from the runs it knows.
export async function refreshQueue() {
  if (queueMissing) return;
  try {
    state.queue = await get("/v1/queue");
  } catch (e) {
    if (e.status === 404) queueMissing = true;
    state.queue = null;
  }
  changed();
}

// refreshQueueSoon reads the queue's figures, and the queued runs (whose
// reason changes with the agents, without an event of their own), half a
// second after a burst of changes.
function refreshQueueSoon() {
  if (queueTimer) return;
  queueTimer = setTimeout(async () => {
    queueTimer = null;
    try {
      for (const r of await list("/v1/runs?status=queued")) {
        const known = state.runs.get(r.id);
        if (!known || known.status === "queued") upsertRun(r);
      }
    } catch { /* the next change tries again */ }
    await refreshQueue();
  }, 500);
}

// Live updates ---------------------------------------------------------

export const EVENT_TYPES = ["run.updated", "batch.updated", "approval.updated", "agent.connected", "agent.disconnected", "agent.updated"];

let source = null;
let pollTimer = null;
let retryTimer = null;
let onSignedOut = () => {};

function setLive(s) {
  state.live = s;
  changed();
}

// start opens the event stream, then loads the state; events that arrive
// while the state loads are applied after it, in order, so nothing between
// the two is lost. When the server has no event stream the page polls.
export async function start(signedOut) {
  onSignedOut = signedOut;
  stop();
  const buffered = [];
  let loaded = false;
  setLive("connecting");
  const es = new EventSource("/v1/events");
  source = es;
  const handle = (type) => (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch { return; }
    if (!msg || typeof msg !== "object" || !msg.data) return;
    if (loaded) apply(type, msg.data);
    else buffered.push([type, msg.data]);
  };
  for (const t of EVENT_TYPES) es.addEventListener(t, handle(t));
  const opened = new Promise((resolve) => {
    es.onopen = () => { setLive("sse"); resolve(true); };
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) {
        resolve(false);
        if (loaded && source === es) streamClosed();
      } else if (state.live === "sse") {
        setLive("connecting"); // the browser reconnects with Last-Event-ID
      }
    };
  });
  const ok = await opened;
  if (source !== es) return;
  try {
    await load();
  } catch (e) {
    if (e.status === 401) { stop(); onSignedOut(); return; }
    throw e;
  }
  loaded = true;
  for (const [type, data] of buffered) apply(type, data);
  if (!ok || es.readyState === EventSource.CLOSED) streamClosed();
}

// streamClosed: the server refused the stream (signed out, or a server
// without /v1/events). Signed-out pages go back to sign-in; otherwise the
// page polls and tries the stream again now and then.
async function streamClosed() {
  if (source) source.close();
  source = null;
  try {
    await get("/v1/me");
  } catch (e) {
    if (e.status === 401) { stop(); onSignedOut(); return; }
  }
  if (!pollTimer) {
    setLive("polling");
    pollTimer = setInterval(() => load().catch(() => {}), 3000);
    retryTimer = setTimeout(() => start(onSignedOut), 30000);
  }
}

export function stop() {
  if (source) source.close();
  source = null;
  clearInterval(pollTimer);
  clearTimeout(retryTimer);
  pollTimer = retryTimer = null;
  state.live = "off";
}

// reset forgets everything (sign-out).
export function reset() {
  stop();
  state.me = null;
  state.queue = null;
  for (const m of [state.runs, state.approvals, state.agents, state.batches, state.firstSeen]) m.clear();
}
