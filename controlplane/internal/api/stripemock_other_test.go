//go:build !linux

package api_test

import "os/exec"

// setParentDeathSignal: only Linux can tie a child's life to its parent's.
func setParentDeathSignal(*exec.Cmd) {}
