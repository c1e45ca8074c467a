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
// delivers the 20 messages from storage once and in order, then live events go on.
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

// TestGapFillDeliversEveryEvent: while bob is offline, alice edits a message, adds carol and
// sends another; with a replay of 1 the server refuses bob's resume, and the fill from the
// channel's stored events delivers all three as their own events, in seq order, each once, with
// FromHistory set. Everything bob receives for the channel from then on is recorded up to the
// next live message, so a duplicate, an extra gap or an event out of order fails the test.
func TestGapFillDeliversEveryEvent(t *testing.T) {
	srv := startServer(t, "--max-replay", "1")
	px := startProxy(t, "127.0.0.1:"+srv.Port)
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "exact", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	bobRT := connect(t, srv.client(t, "bob", px.URL), parley.WithBackoff(20*time.Millisecond, 200*time.Millisecond))
	if _, err := bobRT.Subscribe(ctx, ch.ID); err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	first, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: "first"})
	if err != nil {
		t.Fatal(err)
	}
	nextEvent(t, bobRT, "the first message live", func(m *parley.MessageNew) bool { return m.Message.Text == "first" })

	px.setOffline(true)
	px.reset()
	waitFor(t, wait, func() bool { return bobRT.State() == parley.StateReconnecting }, func() string {
		return "bob reconnecting, state " + bobRT.State().String()
	})
	if _, err := alice.EditMessage(ctx, ch.ID, first.Message.ID, "first (edited)", nil); err != nil {
		t.Fatalf("edit: %v", err)
	}
	if _, err := alice.AddMember(ctx, ch.ID, "carol", ""); err != nil {
		t.Fatalf("add carol: %v", err)
	}
	if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: "second"}); err != nil {
		t.Fatal(err)
	}
	px.setOffline(false)

	// describe renders a Gap or a channel event of ch (anything else: ""), with what matters.
	describe := func(ev parley.Event) string {
		if g, ok := ev.(*parley.Gap); ok && g.ChannelID == ch.ID {
			return fmt.Sprintf("gap (%d, %d] %s", g.From, g.To, g.Reason)
		}
		ce, ok := ev.(parley.ChannelEvent)
		if !ok || ce.Channel().ChannelID != ch.ID {
			return ""
		}
		meta := ce.Channel()
		var what string
		switch e := ev.(type) {
		case *parley.MessageNew:
			what = e.Message.Text
		case *parley.MessageUpdated:
			what = e.Message.Text
		case *parley.MemberAdded:
			what = e.Member.UserID
		}
		return fmt.Sprintf("%d %s %s (from history %v)", meta.Seq, ev.Type(), what, meta.FromHistory)
	}
	var got []string
	record := func(what string, done func(parley.Event) bool) {
		t.Helper()
		deadline := time.NewTimer(wait)
		defer deadline.Stop()
		for {
			select {
			case ev, ok := <-bobRT.Events():
				if !ok {
					t.Fatalf("events closed while waiting for %s; got %q", what, got)
				}
				if d := describe(ev); d != "" {
					got = append(got, d)
				}
				if done(ev) {
					return
				}
			case <-deadline.C:
				t.Fatalf("expected %s within %v; got %q", what, wait, got)
			}
		}
	}
	isText := func(text string) func(parley.Event) bool {
		return func(ev parley.Event) bool {
			m, ok := ev.(*parley.MessageNew)
			return ok && m.ChannelID == ch.ID && m.Message.Text == text
		}
	}
	record("the second message, filled", isText("second"))
	// The fill is over: the next message is live, and nothing of the gap comes again before it.
	if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: "third"}); err != nil {
		t.Fatal(err)
	}
	record("the third message, live", isText("third"))

	s := first.Message.Seq
	want := []string{
		fmt.Sprintf("gap (%d, %d] resume_refused: too_far_behind", s, s+3),
		fmt.Sprintf("%d message.updated first (edited) (from history true)", s+1),
		fmt.Sprintf("%d member.added carol (from history true)", s+2),
		fmt.Sprintf("%d message.new second (from history true)", s+3),
		fmt.Sprintf("%d message.new third (from history false)", s+4),
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("bob's events of the channel after the outage:\n got %q\nwant %q", got, want)
	}
	if last, _ := bobRT.LastSeq(ch.ID); last != s+4 {
		t.Fatalf("expected last delivered seq %d, got %d", s+4, last)
	}
}

// TestChannelAddedReachesTheAddedUser: a connected user who is added to a channel (or in a
// new one) hears of it at once with their role, without a subscription.
func TestChannelAddedReachesTheAddedUser(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	daveRT := connect(t, srv.client(t, "dave"))
	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "later"})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	if _, err := alice.AddMember(ctx, ch.ID, "dave", parley.RoleModerator); err != nil {
		t.Fatalf("add dave: %v", err)
	}
	added := nextEvent(t, daveRT, "channel.added for dave", func(*parley.ChannelAdded) bool { return true })
	if added.Info.ID != ch.ID || added.By != "alice" || added.Info.Role != parley.RoleModerator {
		t.Fatalf("expected %s added by alice as moderator, got %+v", ch.ID, added)
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

// TestResumeSplitsAtTheStatedChannelCap: with at most 3 channels per resume frame, bob resumes
// 8 channels after a drop. The client sends three resume frames, so every missed message is
// replayed by the server (no Gap, nothing from history) instead of the whole resume being
// refused and filled from storage.
func TestResumeSplitsAtTheStatedChannelCap(t *testing.T) {
	srv := startServer(t, "--ws-max-resume-channels", "3")
	px := startProxy(t, "127.0.0.1:"+srv.Port)
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	var ids []string
	for i := range 8 {
		ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: fmt.Sprintf("cap %d", i), Members: []string{"bob"}})
		if err != nil {
			t.Fatalf("create channel: %v", err)
		}
		ids = append(ids, ch.ID)
	}
	bobRT := connect(t, srv.client(t, "bob", px.URL), parley.WithBackoff(20*time.Millisecond, 200*time.Millisecond))
	if got := bobRT.Welcome().Limits.MaxResumeChannels; got != 3 {
		t.Fatalf("welcome states max_resume_channels %d, want 3", got)
	}
	for _, id := range ids {
		if _, err := bobRT.Subscribe(ctx, id); err != nil {
			t.Fatalf("subscribe: %v", err)
		}
	}
	px.setOffline(true)
	px.reset()
	waitFor(t, wait, func() bool { return bobRT.State() == parley.StateReconnecting }, func() string {
		return "bob reconnecting, state " + bobRT.State().String()
	})
	for _, id := range ids {
		if _, err := alice.SendMessage(ctx, id, parley.SendParams{Text: "missed in " + id}); err != nil {
			t.Fatal(err)
		}
	}
	px.setOffline(false)
	got := map[string]bool{}
	deadline := time.After(wait)
	for len(got) < len(ids) {
		select {
		case ev := <-bobRT.Events():
			switch e := ev.(type) {
			case *parley.Gap:
				t.Fatalf("a gap: the resume was refused (%+v)", e)
			case *parley.MessageNew:
				if e.FromHistory {
					t.Fatalf("%q came from history, not from the resume", e.Message.Text)
				}
				got[e.ChannelID] = true
			}
		case <-deadline:
			t.Fatalf("only %d of %d channels got their missed message", len(got), len(ids))
		}
	}
}
