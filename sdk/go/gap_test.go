package parley_test

import (
	"fmt"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestLiveGapFilledFromHistory: three live events never reach the client (dropped on arrival);
// the next live event reveals the hole, which is filled from the channel's stored events before it is delivered:
// every message once, in seq order.
func TestLiveGapFilledFromHistory(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "gap", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	bobRT := connect(t, srv.client(t, "bob"))
	start, err := bobRT.Subscribe(ctx, ch.ID)
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	parley.DropLiveMessages(bobRT, ch.ID, start+2, start+4)
	for i := range 6 {
		if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: fmt.Sprintf("m%d", i)}); err != nil {
			t.Fatal(err)
		}
	}
	first := nextEvent(t, bobRT, "m0 live", func(*parley.MessageNew) bool { return true })
	if first.Message.Text != "m0" || first.FromHistory {
		t.Fatalf("expected m0 live, got %+v", first)
	}
	gap := nextEvent(t, bobRT, "a live gap", func(*parley.Gap) bool { return true })
	if gap.Reason != "live_gap" || gap.From != start+1 || gap.To != start+4 {
		t.Fatalf("expected a live gap (%d, %d], got %+v", start+1, start+4, gap)
	}
	for i := 1; i < 6; i++ {
		m := nextEvent(t, bobRT, fmt.Sprintf("m%d", i), func(*parley.MessageNew) bool { return true })
		fromHistory := i >= 1 && i <= 3
		if m.Message.Text != fmt.Sprintf("m%d", i) || m.Seq != start+1+uint64(i) || m.FromHistory != fromHistory {
			t.Fatalf("expected m%d at seq %d (from history %v), got %q seq %d (from history %v)", i, start+1+uint64(i), fromHistory, m.Message.Text, m.Seq, m.FromHistory)
		}
	}
}

// TestBackoff: delays grow exponentially up to the ceiling, with jitter, and never undercut a
// delay the server asked for.
func TestBackoff(t *testing.T) {
	srv := startServer(t)
	rt := connect(t, srv.client(t, "alice"), parley.WithBackoff(100*time.Millisecond, time.Second))
	for attempt := range 10 {
		ceiling := min(100*time.Millisecond<<attempt, time.Second)
		for range 50 {
			if d := parley.Backoff(rt, attempt, nil); d < 0 || d > ceiling {
				t.Fatalf("attempt %d: expected a delay within [0, %v], got %v", attempt, ceiling, d)
			}
		}
	}
	asked := &parley.Error{Code: "rate_limited", RetryAfter: 3 * time.Second}
	if d := parley.Backoff(rt, 0, fmt.Errorf("upgrade: %w", asked)); d < 3*time.Second {
		t.Fatalf("expected the server's 3 s delay to be honoured, got %v", d)
	}
	if d := parley.Backoff(rt, 0, &parley.CloseError{Code: parley.CloseRateLimitFlood}); d < time.Second {
		t.Fatalf("expected at least 1 s after a flood close, got %v", d)
	}
}
