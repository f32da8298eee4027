package sqlstore

import (
	"encoding/base64"
	"strconv"
	"strings"

	"github.com/copelf/copelf/controlplane/internal/store"
	"github.com/copelf/copelf/protocol"
)

const (
	defaultLimit = 50
	maxLimit     = 500
)

// cursor is a position in a list ordered newest first by (time, id).
type cursor struct {
	at int64
	id string
}

func (c cursor) encode() string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(c.at, 10) + "|" + c.id))
}

func decodeCursor(s string) (*cursor, error) {
	if s == "" {
		return nil, nil
	}
	bad := protocol.Errorf(protocol.CodeBadRequest, "The cursor is not valid.").With("fields", []protocol.FieldProblem{{Field: "cursor", Problem: "is not a cursor from this list"}})
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return nil, bad
	}
	at, id, ok := strings.Cut(string(raw), "|")
	n, err := strconv.ParseInt(at, 10, 64)
	if !ok || err != nil || id == "" {
		return nil, bad
	}
	return &cursor{at: n, id: id}, nil
}

func pageLimit(p store.Page) int {
	switch {
	case p.Limit <= 0:
		return defaultLimit
	case p.Limit > maxLimit:
		return maxLimit
	}
	return p.Limit
}

// pageQuery appends the cursor condition, the order and the limit (one more
// than asked, to know whether a next page exists) to a query with a WHERE.
func pageQuery(query, timeCol string, args []any, p store.Page) (string, []any, int, error) {
	c, err := decodeCursor(p.Cursor)
	if err != nil {
		return "", nil, 0, err
	}
	if c != nil {
		query += ` AND (` + timeCol + ` < ? OR (` + timeCol + ` = ? AND id < ?))`
		args = append(args, c.at, c.at, c.id)
	}
	limit := pageLimit(p)
	query += ` ORDER BY ` + timeCol + ` DESC, id DESC LIMIT ` + strconv.Itoa(limit+1)
	return query, args, limit, nil
}

// trimPage cuts the extra row and returns the next cursor ("" at the end).
func trimPage[T any](items []T, limit int, key func(T) cursor) ([]T, string) {
	if len(items) <= limit {
		return items, ""
	}
	items = items[:limit]
	return items, key(items[limit-1]).encode()
}
