//go:build !race

package storetest

// raceEnabled: the binary runs under the race detector.
const raceEnabled = false
