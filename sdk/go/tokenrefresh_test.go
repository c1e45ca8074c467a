package parley_test

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// shortToken signs a token for user valid for ttl (e.g. "4s") with the server's development key.
func (s *server) shortToken(user, ttl string) (string, error) {
	out, err := exec.Command(s.bin, "token", "--user", user, "--data-dir", s.dir, "--ttl", ttl).Output()
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// The server closes a connection (4011) when its token expires; the Realtime client asks its
// TokenSource for a new token ahead of that and sends auth.refresh, so one connection outlives
// several 4-second tokens without a reconnect.
func TestConnectionOutlivesItsTokenByRefreshing(t *testing.T) {
	srv := startServer(t)
	var asked atomic.Int32
	src := func(context.Context) (string, error) {
		asked.Add(1)
		return srv.shortToken("alice", "4s")
	}
	c, err := parley.New(srv.URL, parley.WithTokenSource(src))
	if err != nil {
		t.Fatal(err)
	}
	reconnects, countOpt := countReconnects()
	rt := connect(t, c, countOpt)
	discardEvents(rt)
	w := rt.Welcome()
	if w.TokenExpiresInMS <= 0 || w.TokenExpiresInMS > 4000 || w.TokenExpiresAt == 0 {
		t.Fatalf("welcome states the token's expiry: at %d, in %d ms", w.TokenExpiresAt, w.TokenExpiresInMS)
	}
	ch, err := c.CreateChannel(ctxT(t), parley.CreateChannelParams{Kind: parley.KindChannel, Name: "refresh"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Subscribe(ctxT(t), ch.ID); err != nil {
		t.Fatal(err)
	}
	time.Sleep(9 * time.Second) // two lifetimes of the first token and more
	if n := asked.Load(); n < 3 {
		t.Fatalf("the TokenSource was asked %d times; expected new tokens ahead of each expiry", n)
	}
	if n := reconnects.Load(); n != 0 {
		t.Fatalf("%d reconnects; the connection should have been kept", n)
	}
	if got := rt.Welcome().SessionID; got != w.SessionID {
		t.Fatalf("a new session %s replaced %s", got, w.SessionID)
	}
	if _, err := rt.Send(ctxT(t), ch.ID, "still here"); err != nil {
		t.Fatalf("send after the first token expired: %v", err)
	}
}

// With a static token the connection ends at the token's expiry with 4011, and the reconnect is
// refused: the client stops with the server's reason.
func TestStaticTokenConnectionEndsAtExpiry(t *testing.T) {
	srv := startServer(t)
	tok, err := srv.shortToken("bob", "3s")
	if err != nil {
		t.Fatal(err)
	}
	c, err := parley.New(srv.URL, parley.WithToken(tok))
	if err != nil {
		t.Fatal(err)
	}
	var saw4011 atomic.Bool
	rt := connect(t, c, parley.WithStateHandler(func(sc parley.StateChange) {
		var ce *parley.CloseError
		if errors.As(sc.Err, &ce) && ce.Code == parley.CloseTokenExpired {
			saw4011.Store(true)
		}
	}))
	discardEvents(rt)
	deadline := time.Now().Add(15 * time.Second)
	for rt.State() != parley.StateDisconnected && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !saw4011.Load() {
		t.Fatalf("no close 4011 seen; state %v", rt.State())
	}
}
