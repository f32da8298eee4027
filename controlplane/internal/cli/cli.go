package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/peterbourgon/ff/v3/ffcli"
	"golang.org/x/term"
)

// Exit statuses of copelf (documented in its -h and the README).
const (
	ExitOK          = 0   // success; a watched run succeeded; a watched batch completed, every iteration succeeded
	ExitError       = 1   // the API answered an error, or the server could not be reached
	ExitUsage       = 2   // bad flags or arguments, or an unreadable config file
	ExitFailed      = 3   // a watched run failed; a watched batch completed with an iteration that did not succeed
	ExitCancelled   = 4   // a watched run or batch was cancelled
	ExitTimedOut    = 5   // a watched run timed out
	ExitInterrupted = 130 // interrupted (Ctrl-C) while waiting
)

// DefaultServer is the control plane's address when none is configured.
const DefaultServer = "http://127.0.0.1:8080"

const rootHelp = `copelf talks to the Copelf control plane's HTTP API: runs, the queue, agents,
approvals and batches, for users and operators.

The server and token come from, first to last: the flags -server and -token,
the environment variables COPELF_SERVER and COPELF_TOKEN, and the config file
(-config, or COPELF_CONFIG, default $XDG_CONFIG_HOME/copelf/config.json or
~/.config/copelf/config.json), a JSON object {"server": "…", "token": "…"}.
The server defaults to ` + DefaultServer + `.

Tables are for people; -o json prints the API's JSON answer as it came (for a
watch, the final run or batch). Flags may follow the command:
copelf runs ls -status queued -o json.

Watching: copelf runs watch and copelf batches watch follow the server's event
stream (reconnecting with Last-Event-ID when it is cut), or poll every 500 ms
when the server has none, and end when the run or batch ends.

EXIT STATUS
  0    success; a watched run succeeded; a watched batch completed and every
       iteration succeeded
  1    the API answered an error (printed as "error: <code>: <message>
       (requestId …)") or the server could not be reached
  2    usage error: unknown command or flag, wrong arguments, bad config file
  3    a watched run failed; a watched batch completed with an iteration that
       did not succeed
  4    a watched run or batch was cancelled
  5    a watched run timed out
  130  interrupted while watching`

// app is one invocation of the CLI.
type app struct {
	client    *Client
	output    string
	pollEvery time.Duration
	stdout    io.Writer
	stderr    io.Writer
	// tty: stdout is a terminal; progress bars are redrawn in place.
	tty   bool
	width int
	now   func() time.Time
	// stall and giveUp tune event streams (see follower).
	stall  time.Duration
	giveUp time.Duration

	env                               env
	flagServer, flagToken, flagConfig string
}

// env is what an invocation reads from its surroundings; tests set it.
type env struct {
	getenv func(string) string
	// tty forces terminal output on (1) or off (-1); 0 asks the terminal.
	tty int
	// width is the terminal's width when tty is forced (default 80).
	width int
}

// Run runs the copelf command with args and returns its exit status.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return run(ctx, args, stdout, stderr, env{getenv: os.Getenv})
}

// errHelp is an explicit -h: the usage goes to stdout and the exit status is 0.
var errHelp = fmt.Errorf("help requested: %w", flag.ErrHelp)

// usageError is a usage mistake found while running a command; it wraps
// flag.ErrHelp so that ffcli prints the command's usage after it.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }
func (e usageError) Unwrap() error { return flag.ErrHelp }

func usagef(format string, args ...any) error { return usageError{fmt.Sprintf(format, args...)} }

// exitError ends the program with a status and no message (a watched run
// or batch that did not succeed; its state is already printed).
type exitError struct {
	code int
	what string
}

func (e exitError) Error() string { return e.what }

// configError is a bad config file or server URL: exit status 2 without
// the usage.
type configError struct{ error }

func run(ctx context.Context, args []string, stdout, stderr io.Writer, e env) int {
	a := &app{client: &Client{}, stdout: stdout, stderr: stderr, env: e, now: time.Now, stall: 90 * time.Second, giveUp: 5 * time.Minute, width: 80}
	root := flag.NewFlagSet("copelf", flag.ContinueOnError)
	a.globalFlags(root)
	root.DurationVar(&a.pollEvery, "poll", 500*time.Millisecond, "how often watch polls a server without event streams")
	cmd := &ffcli.Command{
		Name:       "copelf",
		ShortUsage: "copelf [-server URL] [-token T] [-config FILE] [-o table|json] <command> …",
		LongHelp:   rootHelp,
		FlagSet:    root,
		Subcommands: []*ffcli.Command{
			a.runsCommand(), a.queueCommand(), a.agentsCommand(), a.approvalsCommand(), a.batchesCommand(),
		},
		Exec: func(_ context.Context, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q", args[0])
			}
			return flag.ErrHelp
		},
	}
	usage := &bytes.Buffer{}
	setOutputs(cmd, usage)

	if err := cmd.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			stdout.Write(usage.Bytes())
			return ExitOK
		}
		fmt.Fprintf(stderr, "error: %s", usage.Bytes())
		return ExitUsage
	}

	err := cmd.Run(ctx)
	a.closeIdle()
	var ue usageError
	var ce configError
	var ee exitError
	var apiErr *APIError
	switch {
	case err == nil:
		return ExitOK
	case errors.Is(err, errHelp):
		stdout.Write(usage.Bytes())
		return ExitOK
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "error: %s\n\n%s", ue.msg, usage.Bytes())
		return ExitUsage
	case errors.Is(err, flag.ErrHelp):
		stderr.Write(usage.Bytes())
		return ExitUsage
	case errors.As(err, &ce):
		fmt.Fprintf(stderr, "error: %v\n", ce.error)
		return ExitUsage
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &apiErr):
		fmt.Fprintf(stderr, "error: %s: %s (requestId %s)\n", apiErr.Code, apiErr.Message, apiErr.RequestID)
		if len(apiErr.Details) > 0 {
			d, _ := json.Marshal(apiErr.Details)
			fmt.Fprintf(stderr, "details: %s\n", d)
		}
		if apiErr.Status == http.StatusUnauthorized && a.client.Token == "" {
			fmt.Fprintln(stderr, "hint: no token is set: use COPELF_TOKEN, -token or the config file's \"token\"")
		}
		return ExitError
	case errors.Is(err, context.Canceled) && ctx.Err() != nil:
		fmt.Fprintln(stderr, "interrupted")
		return ExitInterrupted
	}
	fmt.Fprintf(stderr, "error: %v\n", err)
	return ExitError
}

// globalFlags registers the flags every command takes, so that they may
// come before or after the command's name.
func (a *app) globalFlags(fs *flag.FlagSet) {
	fs.StringVar(&a.flagServer, "server", "", "control plane URL (COPELF_SERVER; default "+DefaultServer+")")
	fs.StringVar(&a.flagToken, "token", "", "API token (prefer COPELF_TOKEN or the config file: flags show in ps)")
	fs.StringVar(&a.flagConfig, "config", "", "config file (COPELF_CONFIG; default $XDG_CONFIG_HOME/copelf/config.json or ~/.config/copelf/config.json)")
	fs.StringVar(&a.output, "o", "table", "output: table or json")
}

// setup resolves the settings once a command's flags are parsed.
func (a *app) setup() error {
	if err := a.checkOutput(); err != nil {
		return err
	}
	if err := a.configure(a.flagServer, a.flagToken, a.flagConfig, a.env); err != nil {
		return configError{err}
	}
	switch {
	case a.env.tty > 0:
		a.tty = true
		if a.env.width > 0 {
			a.width = a.env.width
		}
	case a.env.tty == 0:
		if f, ok := a.stdout.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			a.tty = true
			if w, _, err := term.GetSize(int(f.Fd())); err == nil && w > 20 {
				a.width = w
			}
		}
	}
	return nil
}

func setOutputs(c *ffcli.Command, w io.Writer) {
	if c.FlagSet == nil {
		c.FlagSet = flag.NewFlagSet(c.Name, flag.ContinueOnError)
	}
	c.FlagSet.SetOutput(w)
	for _, s := range c.Subcommands {
		setOutputs(s, w)
	}
}

func (a *app) checkOutput() error {
	if a.output != "table" && a.output != "json" {
		return usagef("-o must be table or json, not %q", a.output)
	}
	return nil
}

func (a *app) json() bool { return a.output == "json" }

// configFile is the config file's content.
type configFile struct {
	Server string `json:"server"`
	Token  string `json:"token"`
}

// configure picks the server and token: flags, then the environment, then
// the config file. A config file named by -config or COPELF_CONFIG must
// exist; the default one may be missing.
func (a *app) configure(server, token, config string, e env) error {
	explicit := true
	if config == "" {
		config = e.getenv("COPELF_CONFIG")
	}
	if config == "" {
		explicit = false
		config = defaultConfigPath(e.getenv)
	}
	var file configFile
	if config != "" {
		raw, err := os.ReadFile(config)
		switch {
		case err == nil:
			dec := json.NewDecoder(bytes.NewReader(raw))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&file); err != nil {
				return fmt.Errorf("config file %s: %v (want {\"server\": \"…\", \"token\": \"…\"})", config, err)
			}
		case errors.Is(err, os.ErrNotExist) && !explicit:
		default:
			return fmt.Errorf("config file: %v", err)
		}
	}
	a.client.Server = first(server, e.getenv("COPELF_SERVER"), file.Server, DefaultServer)
	a.client.Token = first(token, e.getenv("COPELF_TOKEN"), file.Token)
	if !strings.HasPrefix(a.client.Server, "http://") && !strings.HasPrefix(a.client.Server, "https://") {
		return fmt.Errorf("the server must be an http:// or https:// URL, not %q", a.client.Server)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = 30 * time.Second
	a.client.HTTP = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	a.client.Stream = &http.Client{Transport: tr}
	return nil
}

// closeIdle closes the connections kept for reuse.
func (a *app) closeIdle() {
	if a.client.HTTP != nil {
		a.client.HTTP.CloseIdleConnections()
	}
}

// defaultConfigPath is $XDG_CONFIG_HOME/copelf/config.json, or
// ~/.config/copelf/config.json ("" when neither is known).
func defaultConfigPath(getenv func(string) string) string {
	if dir := getenv("XDG_CONFIG_HOME"); filepath.IsAbs(dir) {
		return filepath.Join(dir, "copelf", "config.json")
	}
	if home := getenv("HOME"); home != "" {
		return filepath.Join(home, ".config", "copelf", "config.json")
	}
	return ""
}

func first(vals ...string) string {
	for _, v := range vals {
		if v != "" {
			return v
		}
	}
	return ""
}

// leaf is a command without subcommands. Its flag set has -o too, and
// flags may come after the positional arguments; nargs is how many
// positional arguments it takes.
func (a *app) leaf(path, shortUsage, shortHelp string, nargs int, flags func(fs *flag.FlagSet), exec func(ctx context.Context, args []string) error) *ffcli.Command {
	fs := flag.NewFlagSet("copelf "+path, flag.ContinueOnError)
	if flags != nil {
		flags(fs)
	}
	a.globalFlags(fs)
	name := path[strings.LastIndexByte(path, ' ')+1:]
	return &ffcli.Command{
		Name: name, ShortUsage: shortUsage, ShortHelp: shortHelp, FlagSet: fs,
		Exec: func(ctx context.Context, args []string) error {
			pos, err := interspersed(fs, args)
			if err != nil {
				return err
			}
			if len(pos) != nargs {
				switch {
				case nargs == 0:
					return usagef("%s takes no arguments", fs.Name())
				case len(pos) < nargs:
					return usagef("%s: missing argument", fs.Name())
				}
				return usagef("%s: unexpected argument %q", fs.Name(), pos[nargs])
			}
			if err := a.setup(); err != nil {
				return err
			}
			return exec(ctx, pos)
		},
	}
}

// interspersed parses flags that follow positional arguments (the flag
// package stops at the first one).
func interspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	out, usage := fs.Output(), fs.Usage
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	defer func() { fs.SetOutput(out); fs.Usage = usage }()
	for len(args) > 0 {
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		if !strings.HasPrefix(args[0], "-") || args[0] == "-" {
			pos = append(pos, args[0])
			args = args[1:]
			continue
		}
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, errHelp
			}
			return nil, usageError{err.Error()}
		}
		consumed := len(args) - fs.NArg()
		if consumed > 0 && args[consumed-1] == "--" {
			return append(pos, fs.Args()...), nil
		}
		args = fs.Args()
	}
	return pos, nil
}
