# Copelf execution system. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
BIN := bin
ADDR ?= 127.0.0.1:8080
DB ?= sqlite://copelf.db
DATA ?= ./copelf-data

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install what builds and tests need (Go toolchain check, Chromium when missing)
	@command -v $(GO) >/dev/null || { echo "Go is missing: install Go 1.26 (/usr/local/go/bin)"; exit 1; }
	@.ci/ensure-deps

.PHONY: build
build: ## build copelfd (and the agent, when present) into bin/
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./controlplane/cmd/... $(if $(wildcard agent/cmd),./agent/cmd/...)

.PHONY: run
run: deps build ## control plane (dev mode, SQLite) + a local headless agent; runs the sample workflow once
	@set -euo pipefail; mkdir -p $(DATA); rm -f $(DATA)/dev.env; \
	$(BIN)/copelfd -dev -addr $(ADDR) -db $(DB) -data-dir $(DATA) -log-format text 2>>$(DATA)/copelfd.log & cp=$$!; \
	ag=; trap 'kill $$ag $$cp 2>/dev/null; wait 2>/dev/null; exit 0' INT TERM; \
	for _ in $$(seq 300); do [ -s $(DATA)/dev.env ] && break; kill -0 $$cp 2>/dev/null || { echo "copelfd failed: see $(DATA)/copelfd.log"; exit 1; }; sleep 0.1; done; \
	set -a; . $(DATA)/dev.env; set +a; \
	$(BIN)/copelf-agent -name local-agent -state-dir $(DATA)/agent -log-format text 2>>$(DATA)/agent.log & ag=$$!; \
	echo "Running the sample workflow once through the local agent (headless Chromium)…"; \
	$(BIN)/copelf runs create -input password=hunter2 -wait $$COPELF_SAMPLE_WORKFLOW || true; \
	echo; echo "The control plane ($$COPELF_SERVER) and the agent keep running; Ctrl-C stops both."; \
	echo "  logs:      $(DATA)/copelfd.log, $(DATA)/agent.log"; \
	echo "  tokens:    $(DATA)/dev.env  (set -a; . $(DATA)/dev.env; set +a)"; \
	echo "  try:       $(BIN)/copelf runs create -input password=hunter2 -wait $$COPELF_SAMPLE_WORKFLOW"; \
	echo "             $(BIN)/copelf agents;  $(BIN)/copelf runs ls;  $(BIN)/copelf queue"; \
	wait $$cp

.PHONY: test
# The PostgreSQL suites need a server: deps installs and starts one when none
# answers, and the suites then fail rather than skip without it.
test bench: export COPELF_NEED_POSTGRES = 1
test: deps ## run every test with the race detector
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...

.PHONY: lint
lint: ## gofmt, go vet and staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

.PHONY: bench
bench: deps ## print every benchmark figure of the README (API, dispatch, agents, browser)
	@echo "== run creations/s and POST latency over HTTP on SQLite, 1 and 32 clients (goal ≥ 2,000/s with 32)"
	$(GO) test -run='^$$' -bench=BenchmarkRunCreateHTTP -benchtime=5000x ./controlplane/internal/app/
	@echo "== dispatch latency, commit of a new run → assign read by an idle agent (goal p50 ≤ 1 ms, p99 ≤ 5 ms)"
	$(GO) test -run='^$$' -bench=BenchmarkDispatchLatency -benchtime=2000x ./controlplane/internal/hub/
	@echo "== run lifecycles/s, no-op agents over real websockets (goal ≥ 5,000/s)"
	$(GO) test -run='^$$' -bench=BenchmarkLifecycles -benchtime=5000x ./controlplane/internal/hub/
	@echo "== the same run lifecycles/s on PostgreSQL (COPELF_TEST_POSTGRES; a fresh database, default durability)"
	COPELF_BENCH_DB=postgres $(GO) test -run='^$$' -bench=BenchmarkLifecycles -benchtime=5000x -timeout 40m ./controlplane/internal/hub/
	@echo "== several replicas on one PostgreSQL database: dispatch latency, commit of a run on replica B → assign read by an idle agent on A, beside the same replica (goal p99 ≤ 10 ms)"
	$(GO) test -run='^$$' -bench=BenchmarkCrossReplicaDispatch -benchtime=1000x ./controlplane/internal/cluster/
	@echo "== run lifecycles/s, 32 no-op agents: SQLite, PostgreSQL with 1 replica, with 2 replicas (goal ≥ 3,000/s on PostgreSQL)"
	$(GO) test -run='^$$' -bench=BenchmarkReplicaLifecycles -benchtime=3000x -timeout 40m ./controlplane/internal/cluster/
	@echo "== server memory per idle connected agent (goal heap ≤ 10 KB)"
	$(GO) test -run='^$$' -bench=BenchmarkIdleAgentMemory -benchtime=1x ./controlplane/internal/hub/
	@echo "== sample workflows, Session.Run vs plain chromedp in the same warm browser (goal copelf/chromedp ≤ 1.05)"
	$(GO) test -run='^$$' -bench=BenchmarkCompareWithChromedp -benchtime=10x ./agent/internal/browser/
	@echo "== assign → the run's first browser command, agent with a warm pool (goal p50 ≤ 20 ms)"
	$(GO) test -run='^$$' -bench=BenchmarkAssignToFirstCommand -benchtime=50x ./agent/internal/cli/
	@echo "== fixture runs/s through the agent with -slots 1, 2, 4 vs plain chromedp in as many tabs (stretch goal agent/plain ≥ 1.3)"
	$(GO) test -run='^$$' -bench=BenchmarkThroughput -benchtime=12x ./agent/internal/cli/

.PHONY: fuzz
fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	@for t in $$(grep -rhoE '^func (Fuzz[A-Za-z0-9_]+)' --include='*_test.go' . | sed 's/func //' | sort -u); do \
	  pkg=$$(grep -rlE "^func $$t\(" --include='*_test.go' . | head -1 | xargs dirname); \
	  echo "== $$t ($$pkg)"; $(GO) test -run='^$$' -fuzz="^$$t$$" -fuzztime=$${FUZZTIME:-30s} $$pkg || exit 1; \
	done

.PHONY: clean
clean: ## remove build output and the dev database
	rm -rf $(BIN) copelf.db copelf.db-shm copelf.db-wal $(DATA)
