package api

import (
	_ "embed"
	"net/http"
)

// openapiYAML is the OpenAPI 3.0 document of this API. The API's tests
// validate every exchange they make against it, so it stays in step with
// the handlers.
//
//go:embed openapi.yaml
var openapiYAML []byte

// openapi serves the document; it needs no token.
func (s *Server) openapi(w http.ResponseWriter, r *http.Request) error {
	w.Header().Set("Content-Type", "application/yaml")
	w.WriteHeader(http.StatusOK)
	_, err := w.Write(openapiYAML)
	return err
}
