package api_test

import (
	"os/exec"
	"syscall"
)

// setParentDeathSignal kills stripe-mock if the test binary dies without
// running TestMain's cleanup (a timeout panic, a kill).
func setParentDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
