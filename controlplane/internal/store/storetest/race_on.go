//go:build race

package storetest

// raceEnabled: the binary runs under the race detector, where SQLite (a Go
// translation of C) runs about ten times slower.
const raceEnabled = true
