// Command copelf is the command-line client of the Copelf control plane.
// The token comes from COPELF_TOKEN (or -token), the server from
// COPELF_SERVER (or -server).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/copelf/copelf/controlplane/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
