package agent

import (
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// idFile is the file under the state directory that keeps the agent's id.
const idFile = "agent-id"

// validClientID is the shape the server accepts for hello.agent.id.
var validClientID = regexp.MustCompile(`^[A-Za-z0-9._:-]{1,128}$`)

// ValidID reports whether id may be used as hello.agent.id.
func ValidID(id string) bool { return validClientID.MatchString(id) }

// DefaultStateDir is where the agent keeps its id: the user's config
// directory (os.UserConfigDir()/copelf), else the cache directory.
func DefaultStateDir() (string, error) {
	dir, err := os.UserConfigDir()
	if err != nil {
		if dir, err = os.UserCacheDir(); err != nil {
			return "", fmt.Errorf("agent: no config or cache directory for the agent id (set -id or -state-dir): %w", err)
		}
	}
	return filepath.Join(dir, "copelf"), nil
}

// LoadOrCreateID returns the id kept in dir/agent-id, creating the file with
// a new random id on first use, so that an agent keeps its identity (and
// the runs the server thinks it holds) across restarts.
func LoadOrCreateID(dir string) (string, error) {
	path := filepath.Join(dir, idFile)
	data, err := os.ReadFile(path)
	switch {
	case err == nil:
		id := strings.TrimSpace(string(data))
		if !ValidID(id) {
			return "", fmt.Errorf("agent: %s does not hold a valid agent id (1 to 128 of [A-Za-z0-9._:-])", path)
		}
		return id, nil
	case !errors.Is(err, fs.ErrNotExist):
		return "", fmt.Errorf("agent: read agent id: %w", err)
	}
	id := newClientID()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("agent: create state directory: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".agent-id-*")
	if err != nil {
		return "", fmt.Errorf("agent: write agent id: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(id + "\n"); err != nil {
		tmp.Close()
		return "", fmt.Errorf("agent: write agent id: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("agent: write agent id: %w", err)
	}
	// Link, not rename: of two agents starting at once, the second keeps
	// the first one's id instead of overwriting it.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return LoadOrCreateID(dir)
		}
		if err := os.Rename(tmp.Name(), path); err != nil {
			return "", fmt.Errorf("agent: write agent id: %w", err)
		}
	}
	return id, nil
}

func newClientID() string {
	var b [15]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return "agent-" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
}
