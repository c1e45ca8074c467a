package parley_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestResumeRefusedFillsFromHistory: bob is offline while 20 messages are sent; the server
// replays at most 5, so it refuses his resume (too_far_behind). The client announces a Gap,
// delivers the 20 messages from history once and in order, then live events go on.
func TestResumeRefusedFillsFromHistory(t *testing.T) {
	srv := startServer(t, "--max-replay", "5")
	px := startProxy(t, "127.0.0.1:"+srv.Port)
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "resume", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	bobRT := connect(t, srv.client(t, "bob", px.URL), parley.WithBackoff(20*time.Millisecond, 200*time.Millisecond))
	start, err := bobRT.Subscribe(ctx, ch.ID)
	if err != nil {
		t.Fatalf("subscribe: %v", err)
	}

	px.setOffline(true)
	px.reset()
	waitFor(t, wait, func() bool { return bobRT.State() == parley.StateReconnecting }, func() string {
		return "bob reconnecting, state " + bobRT.State().String()
	})
	for i := range 20 {
		if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: fmt.Sprintf("missed %02d", i)}); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
	}
	px.setOffline(false)

	gap := nextEvent(t, bobRT, "a Gap for the refused resume", func(*parley.Gap) bool { return true })
	if gap.ChannelID != ch.ID || gap.From != start || gap.To != start+20 || gap.Reason != "resume_refused: too_far_behind" {
		t.Fatalf("expected a gap (%d, %d] refused as too_far_behind, got %+v", start, start+20, gap)
	}
	for i := range 20 {
		m := nextEvent(t, bobRT, fmt.Sprintf("missed %02d from history", i), func(*parley.MessageNew) bool { return true })
		if m.Message.Text != fmt.Sprintf("missed %02d", i) || !m.FromHistory || m.Seq != start+1+uint64(i) {
			t.Fatalf("expected missed %02d (seq %d) from history, got %q seq %d (from history %v)", i, start+1+uint64(i), m.Message.Text, m.Seq, m.FromHistory)
		}
	}
	if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: "live again"}); err != nil {
		t.Fatal(err)
	}
	live := nextEvent(t, bobRT, "the live message after the fill", func(*parley.MessageNew) bool { return true })
	if live.Message.Text != "live again" || live.FromHistory || live.Seq != start+21 {
		t.Fatalf("expected the next live message at seq %d, got %q seq %d", start+21, live.Message.Text, live.Seq)
	}
	if last, _ := bobRT.LastSeq(ch.ID); last != start+21 {
		t.Fatalf("expected last delivered seq %d, got %d", start+21, last)
	}

	// A send the server refuses fails with its typed error and leaves the outbox.
	_, err = bobRT.Send(ctx, "ch_00000000000000000000000000", "to nowhere")
	var perr *parley.Error
	if !errors.As(err, &perr) || (perr.Code != "not_found" && perr.Code != "not_a_member" && perr.Code != "invalid_argument") {
		t.Fatalf("expected a typed refusal of a send to an unknown channel, got %v", err)
	}
	if n := len(bobRT.Pending()); n != 0 {
		t.Fatalf("expected an empty outbox after the refusal, got %d pending", n)
	}
}

// TestRefusedTokenIsFinal: a token the server refuses fails REST calls with a typed 401 and
// ends a Realtime client (Disconnected, with the error) instead of reconnecting forever.
func TestRefusedTokenIsFinal(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	c, err := parley.New(srv.URL, parley.WithToken("not-a-jwt"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.ListChannels(ctx)
	var perr *parley.Error
	if !errors.As(err, &perr) || perr.Status != 401 || !parley.IsAuthError(err) {
		t.Fatalf("expected a 401 token error over REST, got %#v", err)
	}
	rt := c.Realtime()
	defer rt.Close()
	if err := rt.WaitConnected(ctx); !parley.IsAuthError(err) {
		t.Fatalf("expected the realtime client to give up with the token error, got %v", err)
	}
	if rt.State() != parley.StateDisconnected || !parley.IsAuthError(rt.Err()) {
		t.Fatalf("expected Disconnected with the token error, got %s, %v", rt.State(), rt.Err())
	}
	if _, err := rt.Send(ctx, "ch_x", "never"); !parley.IsAuthError(err) {
		t.Fatalf("expected a send after giving up to fail with the token error, got %v", err)
	}
	select {
	case _, open := <-rt.Events():
		if open {
			t.Fatal("expected no event")
		}
	case <-time.After(wait):
		t.Fatal("expected Events() closed after giving up")
	}
}
