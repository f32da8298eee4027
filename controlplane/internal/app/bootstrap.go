package app

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/sirupsen/logrus"

	"github.com/copelf/copelf/controlplane/internal/api"
	"github.com/copelf/copelf/controlplane/internal/ids"
	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const (
	adminEmail = "admin@copelf.local"
	demoEmail  = "demo@copelf.local"
	// demoPassword is the dev seed's sign-in password: dev mode only.
	demoPassword = "copelf-demo"
	demoCredits  = 1000
)

// bootstrapAdmin makes sure an admin can act: with a configured token it is
// registered for the admin user; without one, the first start generates a
// token and prints it once.
func bootstrapAdmin(ctx context.Context, st store.Store, token string, out io.Writer, log logrus.FieldLogger) error {
	admin, err := st.UserGetByEmail(ctx, adminEmail)
	created := false
	if protocol.ErrorCode(err) == protocol.CodeNotFound {
		hash, herr := api.HashPassword(ids.NewToken("pw"))
		if herr != nil {
			return herr
		}
		admin, err = st.UserCreate(ctx, store.UserCreateParams{Email: adminEmail, PasswordHash: hash, Role: store.RoleAdmin, Plan: store.PlanPro})
		created = true
	}
	if err != nil {
		return err
	}
	if token != "" {
		if _, _, err := st.TokenGetByHash(ctx, ids.HashToken(token)); err == nil {
			return nil
		}
		_, err := st.TokenCreate(ctx, store.TokenCreateParams{UserID: admin.ID, Kind: store.TokenAPI, Name: "bootstrap (COPELF_ADMIN_TOKEN)", Hash: ids.HashToken(token)})
		if err == nil {
			log.WithField("userId", admin.ID).Info("admin token from the environment registered")
		}
		return err
	}
	if !created {
		return nil
	}
	generated, err := api.CreateToken(ctx, st, admin.ID, store.TokenAPI, "bootstrap (generated)")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "\nAdmin token (shown once; keep it, or set COPELF_ADMIN_TOKEN):\n  %s\n\n", generated)
	return nil
}

// sampleDefinition is the dev seed's workflow over the fixture site.
func sampleDefinition(baseURL string) json.RawMessage {
	def := map[string]any{
		"version":   1,
		"timeoutMs": 60000,
		"variables": []map[string]any{
			{"name": "username", "type": "string", "required": true, "default": "ada"},
			{"name": "password", "type": "secret", "required": true},
			{"name": "query", "type": "string", "default": "chromium"},
		},
		"steps": []map[string]any{
			{"type": "navigate", "url": baseURL + "/demo/login.html"},
			{"type": "type", "selector": "#username", "text": "{{username}}"},
			{"type": "type", "selector": "#password", "text": "{{password}}"},
			{"type": "click", "selector": "#login"},
			{"type": "waitFor", "selector": "#welcome", "state": "visible"},
			{"type": "extract", "selector": "#welcome", "output": "greeting"},
			{"type": "type", "selector": "#search", "text": "{{query}}"},
			{"type": "waitFor", "selector": "#results li", "state": "visible"},
			{"type": "extract", "selector": "#results li", "output": "firstResult"},
			{"type": "screenshot", "name": "results"},
		},
	}
	b, _ := json.Marshal(def)
	return b
}

// seedDev creates (once) the demo account with credits and the sample
// workflow, then makes fresh API and agent tokens for this start, prints
// them and writes them to DATA_DIR/dev.env (mode 0600).
func seedDev(ctx context.Context, st store.Store, cfg Config, baseURL string, out io.Writer) error {
	demo, err := st.UserGetByEmail(ctx, demoEmail)
	if protocol.ErrorCode(err) == protocol.CodeNotFound {
		hash, herr := api.HashPassword(demoPassword)
		if herr != nil {
			return herr
		}
		demo, err = st.UserCreate(ctx, store.UserCreateParams{Email: demoEmail, PasswordHash: hash, Role: store.RoleOperator, Plan: store.PlanPro})
	}
	if err != nil {
		return err
	}
	if _, err := st.CreditsGrant(ctx, store.CreditsGrantParams{AccountID: demo.ID, Amount: demoCredits, Kind: store.LedgerGrant, Reason: "dev seed", Key: "dev-seed:" + demo.ID}); err != nil {
		return err
	}
	wfs, _, err := st.WorkflowList(ctx, demo.ID, store.Page{Limit: 500})
	if err != nil {
		return err
	}
	var sample *store.Workflow
	for _, w := range wfs {
		if w.Name == "Sample: fixture login and search" {
			sample = w
		}
	}
	def := sampleDefinition(baseURL)
	if _, err := protocol.DecodeDefinition(def); err != nil {
		return fmt.Errorf("sample definition: %w", err)
	}
	if sample == nil {
		sample, err = st.WorkflowCreate(ctx, store.WorkflowCreateParams{AccountID: demo.ID, Name: "Sample: fixture login and search", Status: protocol.WorkflowReady, Definition: def})
	} else if sample.ActiveRunID == "" && sample.ActiveBatchID == "" {
		// The address may differ from the last start.
		sample, err = st.WorkflowUpdate(ctx, store.WorkflowUpdateParams{ID: sample.ID, Definition: def})
	}
	if err != nil {
		return err
	}
	apiToken, err := api.CreateToken(ctx, st, demo.ID, store.TokenAPI, "dev")
	if err != nil {
		return err
	}
	agentToken, err := api.CreateToken(ctx, st, demo.ID, store.TokenAgent, "dev agent")
	if err != nil {
		return err
	}
	envFile := filepath.Join(cfg.DataDir, "dev.env")
	env := fmt.Sprintf("COPELF_SERVER=%s\nCOPELF_TOKEN=%s\nCOPELF_AGENT_TOKEN=%s\nCOPELF_SAMPLE_WORKFLOW=%s\n", baseURL, apiToken, agentToken, sample.ID)
	if err := os.WriteFile(envFile, []byte(env), 0o600); err != nil {
		return err
	}
	fmt.Fprintf(out, `
Copelf dev mode — control plane at %[1]s
  demo account   %[2]s / %[3]s (operator, plan pro, %[4]d credits at first start)
  API token      %[5]s
  agent token    %[6]s
  sample flow    %[7]s
  (the same values are in %[8]s)

Try:
  curl -s -H "Authorization: Bearer $COPELF_TOKEN" %[1]s/v1/me
  curl -s -H "Authorization: Bearer $COPELF_TOKEN" -H 'Content-Type: application/json' \
       -d '{"inputs":{"password":"hunter2"}}' %[1]s/v1/workflows/%[7]s/runs
`, baseURL, demoEmail, demoPassword, demoCredits, apiToken, agentToken, sample.ID, envFile)
	return nil
}
