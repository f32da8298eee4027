package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The binaries are built once per test binary, on first use, into a
// directory TestMain removes at the end.
var (
	binDir    string
	buildOnce sync.Once
	buildErr  error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "copelf-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	binDir = filepath.Join(dir, "bin")
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// goTool is the go command: the one on PATH, else the toolchain's own.
func goTool() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	//lint:ignore SA1019 the toolchain that built the test is the best guess left
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// binary returns the path of copelfd or copelf-agent, building both the
// first time.
func binary(t *testing.T, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		start := time.Now()
		cmd := exec.Command(goTool(), "build", "-o", binDir+string(os.PathSeparator), "./controlplane/cmd/copelfd", "./agent/cmd/copelf-agent")
		cmd.Dir = repoRoot(t)
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
			return
		}
		t.Logf("built copelfd and copelf-agent in %s", time.Since(start).Round(time.Millisecond))
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, name)
}

// proc is a subprocess whose output goes to a log file, dumped (its tail)
// when the test fails.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when the process has exited and been reaped
}

// startProc starts bin with args and extra environment variables. The
// process is killed at the end of the test if it still runs.
func startProc(t *testing.T, name, bin string, env []string, args ...string) *proc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			_ = cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("--- %s log (tail) ---\n%s", name, tail(logPath, 80))
		}
	})
	return p
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signal sends sig to the process.
func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %s to %s: %v", sig, p.name, err)
	}
}

// wait waits for the process to exit and returns its exit code (-1 when a
// signal ended it).
func (p *proc) wait(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(within):
		t.Fatalf("%s did not exit within %s", p.name, within)
	}
	return p.cmd.ProcessState.ExitCode()
}

// kill sends SIGKILL and waits until the process is gone.
func (p *proc) kill(t *testing.T) {
	t.Helper()
	p.signal(t, syscall.SIGKILL)
	p.wait(t, 30*time.Second)
}

// logContains reports whether one line of the process's log contains every
// one of parts.
func (p *proc) logContains(parts ...string) bool {
	f, err := os.Open(p.log)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
next:
	for sc.Scan() {
		for _, s := range parts {
			if !strings.Contains(sc.Text(), s) {
				continue next
			}
		}
		return true
	}
	return false
}

func tail(path string, lines int) string {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	var all []string
	for _, l := range strings.Split(strings.TrimRight(string(raw), "\n"), "\n") {
		// Successful requests (the tests poll) would crowd out the rest.
		if strings.Contains(l, "msg=request ") && (strings.Contains(l, "status=200") || strings.Contains(l, "status=201")) {
			continue
		}
		all = append(all, l)
	}
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

// freeAddr returns a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// daemon is copelfd run as a subprocess on a fixed address and database, so
// that it can be killed and started again on both.
type daemon struct {
	*server
	dataDir string
	args    []string
	env     []string
	p       *proc
	starts  int
}

// startDaemon starts copelfd on a free port with a fresh SQLite database and
// an admin token, and waits until /healthz answers.
func startDaemon(t *testing.T, extra ...string) *daemon {
	t.Helper()
	dir := t.TempDir()
	addr := freeAddr(t)
	admin := fmt.Sprintf("copelf_api_e2e-admin-%d", time.Now().UnixNano())
	d := &daemon{
		server:  &server{URL: "http://" + addr, Admin: admin, stop: func() {}},
		dataDir: filepath.Join(dir, "data"),
		args: append([]string{"-addr", addr, "-db", "sqlite://" + filepath.Join(dir, "copelf.db"), "-data-dir", filepath.Join(dir, "data"),
			"-log-format", "text", "-log-level", "info"}, extra...),
		env: []string{"COPELF_ADMIN_TOKEN=" + admin},
	}
	d.start(t)
	return d
}

// start (re)starts the process and waits for /healthz.
func (d *daemon) start(t *testing.T) {
	t.Helper()
	d.starts++
	d.p = startProc(t, fmt.Sprintf("copelfd-%d", d.starts), binary(t, "copelfd"), d.env, d.args...)
	deadline := time.Now().Add(60 * time.Second)
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		res, err := client.Get(d.URL + "/healthz")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return
			}
		}
		if d.p.exited() {
			t.Fatalf("copelfd exited with %d before it answered /healthz", d.p.cmd.ProcessState.ExitCode())
		}
		if time.Now().After(deadline) {
			t.Fatalf("copelfd did not answer /healthz within 60s: %v", err)
		}
		select {
		case <-d.p.done:
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// agentProc is copelf-agent run as a subprocess.
type agentProc struct {
	*proc
	clientID string
	tmp      string // the agent's TMPDIR: Chromium's profile directories live under it
}

// startAgent starts an agent with its own id, state directory and TMPDIR,
// and waits until the server lists it as connected.
func startAgent(t *testing.T, s *server, apiToken, agentToken string, extra ...string) *agentProc {
	t.Helper()
	chrome := chromium(t)
	id := fmt.Sprintf("e2e-%d", time.Now().UnixNano())
	for i, a := range extra {
		if a == "-id" && i+1 < len(extra) {
			id = extra[i+1] // the last -id wins, as with the flag package
		}
	}
	tmp := t.TempDir()
	args := append([]string{"-server", s.URL, "-id", id, "-name", t.Name(), "-state-dir", t.TempDir(), "-chrome", chrome,
		"-log-format", "text", "-log-level", "debug"}, extra...)
	a := &agentProc{clientID: id, tmp: tmp}
	a.proc = startProc(t, "agent-"+id, binary(t, "copelf-agent"), []string{"COPELF_AGENT_TOKEN=" + agentToken, "TMPDIR=" + tmp}, args...)
	// Registered after startProc's cleanup, so it runs first: nothing of
	// this agent's Chromium outlives the test, whatever killed the agent.
	t.Cleanup(func() {
		if !a.exited() {
			_ = a.cmd.Process.Kill()
			<-a.done
		}
		killUsing(tmp)
	})
	eventually(t, 90*time.Second, "agent "+id+" connected", func() (bool, string) {
		if a.exited() {
			t.Fatalf("copelf-agent exited with %d", a.cmd.ProcessState.ExitCode())
		}
		return agentListed(t, s, apiToken, id), ""
	})
	return a
}

// agentListed reports whether GET /v1/agents lists the agent.
func agentListed(t *testing.T, s *server, apiToken, clientID string) bool {
	t.Helper()
	for _, it := range s.call(t, "GET", "/v1/agents", apiToken, nil, 200)["items"].([]any) {
		if it.(map[string]any)["clientId"] == clientID {
			return true
		}
	}
	return false
}

// chromiumChildren returns the processes whose parent is pid and whose
// command line mentions chromium: the agent's browser processes.
func chromiumChildren(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ppid(child) != pid {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte("chromium")) {
			out = append(out, child)
		}
	}
	return out
}

// ppid reads a process's parent from /proc/<pid>/stat (0 when unknown).
func ppid(pid int) int {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0
	}
	// pid (comm) state ppid …; comm may hold spaces and parentheses.
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0
	}
	n, _ := strconv.Atoi(f[1])
	return n
}

// using lists the live processes whose command line mentions a path under
// dir (Chromium processes of an agent: their profile is under the agent's
// TMPDIR).
func using(dir string) []int {
	return processes(func(args [][]byte) bool {
		return slices.ContainsFunc(args, func(a []byte) bool { return bytes.Contains(a, []byte(dir+string(os.PathSeparator))) })
	})
}

// processes lists the live (not zombie) processes, this one excepted, whose
// command line arguments match.
func processes(match func(args [][]byte) bool) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(cmdline) == 0 || !match(bytes.Split(cmdline, []byte{0})) {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil {
			if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && (stat[i+2] == 'Z' || stat[i+2] == 'X') {
				continue
			}
		}
		out = append(out, pid)
	}
	return out
}

// killUsing kills every process whose command line mentions dir: Chromium
// helpers left behind by a killed agent.
func killUsing(dir string) {
	for pass := 0; pass < 3; pass++ {
		pids := using(dir)
		if len(pids) == 0 {
			return
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
