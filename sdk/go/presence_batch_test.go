package parley_test

import (
	"fmt"
	"testing"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestPresenceBatch: several users come online at once in a channel; the server coalesces their
// changes into one presence.batch frame for the subscriber, and the SDK delivers one
// PresenceChanged per user.
func TestPresenceBatch(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	owner := srv.client(t, "owner")
	ch, err := owner.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "crowd"})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	users := []string{"u1", "u2", "u3", "u4"}
	for _, u := range users {
		if _, err := owner.AddMember(ctx, ch.ID, u, ""); err != nil {
			t.Fatalf("add %s: %v", u, err)
		}
	}
	ownerRT := connect(t, owner)
	if _, err := ownerRT.Subscribe(ctx, ch.ID); err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	for _, u := range users {
		connect(t, srv.client(t, u))
	}
	online := map[string]bool{}
	for len(online) < len(users) {
		e := nextEvent(t, ownerRT, fmt.Sprintf("%d of %d users online", len(online)+1, len(users)), func(e *parley.PresenceChanged) bool {
			return e.Status == parley.StatusOnline
		})
		online[e.UserID] = true
	}
	for _, u := range users {
		if !online[u] {
			t.Fatalf("no presence of %s among %v", u, online)
		}
	}
}
