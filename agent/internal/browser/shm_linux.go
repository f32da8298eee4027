package browser

import "syscall"

// devShmFree returns the free bytes of /dev/shm, 0 when unknown.
func devShmFree() uint64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs("/dev/shm", &st); err != nil {
		return 0
	}
	return st.Bavail * uint64(st.Bsize)
}
