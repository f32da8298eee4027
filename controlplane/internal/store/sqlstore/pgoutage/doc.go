// Package pgoutage tests the store on PostgreSQL through outages: the
// server vanishing behind a proxy, and the server restarting (a cluster of
// the test's own). It has tests only.
package pgoutage
