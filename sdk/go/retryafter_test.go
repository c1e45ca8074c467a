package parley_test

import (
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"sync"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestServerRequestedDelayIsHonoured: the first WebSocket upgrade is refused with 503 and
// Retry-After: 1 (as a proxy or an overloaded server would); the client, although its own
// backoff is 50 ms at most, waits the second before it tries again, then connects.
func TestServerRequestedDelayIsHonoured(t *testing.T) {
	srv := startServer(t)
	target, _ := url.Parse(srv.URL)
	forward := httputil.NewSingleHostReverseProxy(target)
	var mu sync.Mutex
	var attempts []time.Time
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/ws" {
			mu.Lock()
			attempts = append(attempts, time.Now())
			first := len(attempts) == 1
			mu.Unlock()
			if first {
				w.Header().Set("Retry-After", "1")
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusServiceUnavailable)
				_, _ = w.Write([]byte(`{"error":{"code":"unavailable","message":"try again later","request_id":"test"}}`))
				return
			}
		}
		forward.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)

	rt := srv.client(t, "alice", front.URL).Realtime(parley.WithBackoff(10*time.Millisecond, 50*time.Millisecond))
	t.Cleanup(func() { _ = rt.Close() })
	if err := rt.WaitConnected(ctxT(t)); err != nil {
		t.Fatalf("expected to connect after the refused attempt, got %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(attempts) < 2 {
		t.Fatalf("expected a refused attempt and a successful one, got %d attempts", len(attempts))
	}
	if gap := attempts[1].Sub(attempts[0]); gap < time.Second {
		t.Fatalf("expected the client to wait the requested 1 s before retrying, it waited %v", gap)
	}
}
