// A minimal Copelf agent for a browser page or extension, speaking the agent
// protocol (protocol/README.md) with the browser's WebSocket API. It takes
// runs and reports each step through `execute`, which the page supplies.
// Used by the end-to-end test of the extension's path.
export class CopelfAgent {
  constructor({ server, token, id, name = "extension", slots = 1, execute, log = () => {} }) {
    Object.assign(this, { server, token, id, name, slots, execute, log });
    this.seq = new Map();      // leaseId → last seq sent
    this.unacked = new Map();  // runId → [event frames]
    this.finished = [];
  }

  connect() {
    const url = this.server.replace(/^http/, "ws") + "/v1/agents/connect";
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, "copelf.v1");
      this.ws = ws;
      ws.onopen = () => this.send({ type: "hello", protocol: 1, token: this.token,
        agent: { id: this.id, name: this.name, kind: "extension", version: "test", slots: this.slots } });
      ws.onerror = () => reject(new Error("websocket error"));
      ws.onclose = (e) => this.log("closed " + e.code);
      ws.onmessage = (m) => {
        const f = JSON.parse(m.data);
        this.log("<- " + f.type);
        switch (f.type) {
          case "welcome":
            this.welcome = f;
            this.send({ type: "ready", slots: this.slots });
            resolve(f);
            break;
          case "error":
            this.log("error " + f.code + " " + f.message);
            if (!this.welcome) reject(new Error(f.code));
            break;
          case "assign":
            this.run(f);
            break;
          case "ack": {
            const q = this.unacked.get(f.runId) || [];
            this.unacked.set(f.runId, q.filter((e) => e.seq > f.seq));
            break;
          }
        }
      };
    });
  }

  send(frame) {
    this.log("-> " + frame.type);
    this.ws.send(JSON.stringify(frame));
  }

  event(assign, fields) {
    const seq = (this.seq.get(assign.leaseId) || 0) + 1;
    this.seq.set(assign.leaseId, seq);
    const ev = { type: "event", runId: assign.runId, leaseId: assign.leaseId, seq, ...fields };
    const q = this.unacked.get(assign.runId) || [];
    q.push(ev);
    this.unacked.set(assign.runId, q);
    this.send(ev);
  }

  async run(assign) {
    this.send({ type: "accept", runId: assign.runId, leaseId: assign.leaseId });
    this.event(assign, { kind: "started" });
    const outputs = {};
    const steps = assign.workflow.definition.steps;
    for (let i = 0; i < steps.length; i++) {
      this.event(assign, { kind: "step_started", step: i, attempts: 1 });
      const started = performance.now();
      const output = await this.execute(steps[i], assign.inputs);
      const fields = { kind: "step_finished", step: i, status: "succeeded", attempts: 1,
        durationMs: Math.round(performance.now() - started) };
      if (steps[i].type === "extract") { fields.output = output; outputs[steps[i].output] = output; }
      this.event(assign, fields);
    }
    this.event(assign, { kind: "finished", status: "succeeded", outputs });
    this.finished.push(assign.runId);
  }
}
