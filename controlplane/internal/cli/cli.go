package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/peterbourgon/ff/v3"
	"github.com/peterbourgon/ff/v3/ffcli"

	"github.com/copelf/copelf/protocol"
)

// app is one invocation of the CLI.
type app struct {
	client *Client
	output string
	poll   time.Duration
	stdout io.Writer
}

// Run runs the copelf command with args. The exit status is 0 on success,
// 1 when a followed run did not succeed or the API answered an error, and 2
// on a usage error.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a := &app{client: &Client{}, stdout: stdout}
	root := flag.NewFlagSet("copelf", flag.ContinueOnError)
	root.SetOutput(stderr)
	root.StringVar(&a.client.Server, "server", "http://127.0.0.1:8080", "control plane URL")
	root.StringVar(&a.client.Token, "token", "", "API token (prefer the environment variable COPELF_TOKEN)")
	root.StringVar(&a.output, "o", "table", "output: table or json")
	root.DurationVar(&a.poll, "poll", 250*time.Millisecond, "how often watch polls")
	cmd := &ffcli.Command{
		Name:        "copelf",
		ShortUsage:  "copelf [-server URL] [-o table|json] <command> …",
		FlagSet:     root,
		Options:     []ff.Option{ff.WithEnvVarPrefix("COPELF")},
		Subcommands: []*ffcli.Command{a.runsCommand()},
		Exec:        func(context.Context, []string) error { return flag.ErrHelp },
	}
	for _, sub := range cmd.Subcommands {
		setOutputs(sub, stderr)
	}
	if err := cmd.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 2
		}
		fmt.Fprintln(stderr, "copelf:", err)
		return 2
	}
	err := cmd.Run(ctx)
	var apiErr *protocol.Error
	var runErr errRunDidNotSucceed
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintln(stderr, ffcli.DefaultUsageFunc(cmd))
		return 2
	case errors.As(err, &runErr):
		return 1
	case errors.As(err, &apiErr):
		fmt.Fprintf(stderr, "copelf: %s: %s (request %s)\n", apiErr.Code, apiErr.Message, apiErr.RequestID)
		return 1
	}
	fmt.Fprintln(stderr, "copelf:", err)
	return 1
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
