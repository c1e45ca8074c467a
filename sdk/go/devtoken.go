package parley

import (
	"context"
	"net/http"
	"time"
)

// DevTokenParams asks a development server for a token.
type DevTokenParams struct {
	UserID string `json:"user_id"`
	// TenantID defaults to "default".
	TenantID string `json:"tenant_id,omitempty"`
	// TTL is the token's lifetime, 1 minute up to the server's maximum token lifetime
	// (--max-token-lifetime, one day by default); 0: one day, or that maximum when lower.
	TTL time.Duration `json:"-"`
}

// DevToken is a token signed with a development server's generated key.
type DevToken struct {
	Token     string    `json:"token"`
	UserID    string    `json:"user_id"`
	TenantID  string    `json:"tenant_id"`
	ExpiresAt time.Time `json:"expires_at"`
}

// RequestDevToken gets a token for any user from a server running in development mode (with
// its generated development key, no JWT keys configured): POST /v1/dev/token, unauthenticated.
// Servers with real keys answer 404 (ErrRouteNotFound or ErrNotFound). For local tools and
// tests only.
func RequestDevToken(ctx context.Context, baseURL string, p DevTokenParams) (*DevToken, error) {
	addrs, err := newAddresses([]string{baseURL}, URLOrderListed)
	if err != nil {
		return nil, err
	}
	c := &Client{addrs: addrs, http: &http.Client{Timeout: 30 * time.Second}, userAgent: "parley-go"}
	body := map[string]any{"user_id": p.UserID}
	if p.TenantID != "" {
		body["tenant_id"] = p.TenantID
	}
	if p.TTL > 0 {
		body["ttl_secs"] = int64(p.TTL / time.Second)
	}
	var t DevToken
	return &t, c.do(ctx, "POST", "/v1/dev/token", nil, body, &t)
}
