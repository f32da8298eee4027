//go:build !linux

package browser

// devShmFree returns 0: only Linux has a /dev/shm worth checking.
func devShmFree() uint64 { return 0 }
