package api_test

import (
	"net/http"
	"testing"
)

// checkOpenAPI validates one real exchange against the OpenAPI document.
// (Filled in with the document; see openapi.yaml.)
func checkOpenAPI(t *testing.T, req *http.Request, res *response) {}
