package parley_test

import (
	"errors"
	"fmt"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestChatFlow: create a channel, add a member, subscribe, send, receive in order, edit,
// delete, page history, typing, read receipts and unread counts, presence — against a real
// server.
func TestChatFlow(t *testing.T) {
	srv := startServer(t, "--presence-grace-ms", "300", "--typing-throttle-ms", "200")
	ctx := ctxT(t)
	alice := srv.client(t, "alice")
	bob := srv.client(t, "bob")

	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "general"})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	if ch.Role != parley.RoleOwner {
		t.Fatalf("expected alice to own the new channel, got role %q", ch.Role)
	}
	if _, err := alice.AddMember(ctx, ch.ID, "bob", ""); err != nil {
		t.Fatalf("add bob: %v", err)
	}

	bobRT := connect(t, bob)
	start, err := bobRT.Subscribe(ctx, ch.ID)
	if err != nil {
		t.Fatalf("bob subscribes: %v", err)
	}
	if start != 1 {
		t.Fatalf("expected the subscription to start after seq 1 (member.added of bob), got %d", start)
	}

	// Presence: alice comes online; bob, subscribed to a shared channel, sees it.
	aliceRT := connect(t, alice)
	nextEvent(t, bobRT, "alice online", func(e *parley.PresenceChanged) bool {
		return e.UserID == "alice" && e.Status == parley.StatusOnline
	})
	if p, err := bob.Presence(ctx, "alice"); err != nil || p.Status != parley.StatusOnline {
		t.Fatalf("expected alice online over REST, got %+v, %v", p, err)
	}
	if _, err := aliceRT.Subscribe(ctx, ch.ID); err != nil {
		t.Fatalf("alice subscribes: %v", err)
	}

	// Sends over the WebSocket arrive in order, each once.
	var sent []*parley.Message
	for i := range 5 {
		m, err := aliceRT.Send(ctx, ch.ID, fmt.Sprintf("hello %d", i))
		if err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		sent = append(sent, m)
	}
	for i, m := range sent {
		got := nextEvent(t, bobRT, "message.new "+m.Text, func(*parley.MessageNew) bool { return true })
		if got.Seq != m.Seq || got.Message.Text != fmt.Sprintf("hello %d", i) || got.Message.SenderID != "alice" {
			t.Fatalf("expected message %d (seq %d, %q), got seq %d %q", i, m.Seq, m.Text, got.Seq, got.Message.Text)
		}
	}

	// Edit and delete are events of their own.
	if _, err := alice.EditMessage(ctx, ch.ID, sent[0].ID, "hello, edited", nil); err != nil {
		t.Fatalf("edit: %v", err)
	}
	up := nextEvent(t, bobRT, "message.updated", func(*parley.MessageUpdated) bool { return true })
	if up.Message.ID != sent[0].ID || up.Message.Text != "hello, edited" || up.Message.EditedAt == nil {
		t.Fatalf("expected the edited message, got %+v", up.Message)
	}
	if _, err := alice.DeleteMessage(ctx, ch.ID, sent[1].ID); err != nil {
		t.Fatalf("delete: %v", err)
	}
	del := nextEvent(t, bobRT, "message.deleted", func(*parley.MessageDeleted) bool { return true })
	if !del.Message.Deleted || del.Message.Text != "" {
		t.Fatalf("expected a tombstone, got %+v", del.Message)
	}
	// The same two events, persisted, over REST; nothing after them yet.
	page, err := bob.Events(ctx, ch.ID, up.Seq-1, 2)
	if err != nil || page.HasMore || len(page.Events) != 2 {
		t.Fatalf("events page: %+v %v", page, err)
	}
	if e, ok := page.Events[0].(*parley.MessageUpdated); !ok || e.Seq != up.Seq || e.Message.Text != "hello, edited" {
		t.Fatalf("expected the edit first, got %#v", page.Events[0])
	}
	if e, ok := page.Events[1].(*parley.MessageDeleted); !ok || e.Seq != del.Seq || !e.Message.Deleted {
		t.Fatalf("expected the deletion second, got %#v", page.Events[1])
	}
	if first, err := bob.Events(ctx, ch.ID, up.Seq-1, 1); err != nil || !first.HasMore || len(first.Events) != 1 {
		t.Fatalf("expected one event and more after it, got %+v %v", first, err)
	}
	if _, err := bob.Events(ctx, ch.ID, 0, 201); !errors.Is(err, parley.ErrInvalidArgument) {
		t.Fatalf("expected invalid_argument for limit 201, got %v", err)
	}

	// Idempotent REST send: the same key returns the same message.
	r1, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{ClientMsgID: "same-key", Text: "once"})
	if err != nil || !r1.Created {
		t.Fatalf("first send: %+v %v", r1, err)
	}
	r2, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{ClientMsgID: "same-key", Text: "once"})
	if err != nil || r2.Created || r2.Message.ID != r1.Message.ID {
		t.Fatalf("expected the retry to return the original message, got %+v %v", r2, err)
	}
	_, err = alice.SendMessage(ctx, ch.ID, parley.SendParams{ClientMsgID: "same-key", Text: "other"})
	if !errors.Is(err, parley.ErrIdempotencyConflict) {
		t.Fatalf("expected idempotency_conflict for the same key with another text, got %v", err)
	}
	nextEvent(t, bobRT, "message.new once", func(e *parley.MessageNew) bool { return e.Message.Text == "once" })

	// History paging: 30 more messages, read back in pages of 7 both ways.
	for i := range 30 {
		if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{Text: fmt.Sprintf("page %02d", i)}); err != nil {
			t.Fatalf("REST send %d: %v", i, err)
		}
	}
	var back []parley.Message
	for m, err := range bob.HistoryBackward(ctx, ch.ID, 0, 7) {
		if err != nil {
			t.Fatalf("history backward: %v", err)
		}
		back = append(back, m)
	}
	if len(back) != 36 {
		t.Fatalf("expected 36 messages in history (5 + 1 + 30), got %d", len(back))
	}
	for i := 1; i < len(back); i++ {
		if back[i].Seq >= back[i-1].Seq {
			t.Fatalf("expected newest-first order, got seq %d after %d", back[i].Seq, back[i-1].Seq)
		}
	}
	var fwd []parley.Message
	for m, err := range bob.HistoryAfter(ctx, ch.ID, 0, 7) {
		if err != nil {
			t.Fatalf("history after: %v", err)
		}
		fwd = append(fwd, m)
	}
	if len(fwd) != 36 || fwd[0].Seq != back[len(back)-1].Seq || fwd[35].Text != "page 29" {
		t.Fatalf("expected the 36 messages oldest first ending with page 29, got %d", len(fwd))
	}
	if !fwd[1].Deleted {
		t.Fatalf("expected the deleted message as a tombstone in history, got %+v", fwd[1])
	}
	for i := range 30 {
		nextEvent(t, bobRT, fmt.Sprintf("page %02d", i), func(e *parley.MessageNew) bool { return e.Message.Text == fmt.Sprintf("page %02d", i) })
	}

	// Typing: alice types, bob sees it.
	if err := aliceRT.StartTyping(ctx, ch.ID); err != nil {
		t.Fatalf("typing: %v", err)
	}
	ty := nextEvent(t, bobRT, "typing start from alice", func(e *parley.Typing) bool { return e.UserID == "alice" })
	if ty.State != parley.TypingStart || ty.ExpiresIn <= 0 {
		t.Fatalf("expected a typing start with an expiry, got %+v", ty)
	}
	if err := aliceRT.StopTyping(ctx, ch.ID); err != nil {
		t.Fatalf("typing stop: %v", err)
	}
	nextEvent(t, bobRT, "typing stop from alice", func(e *parley.Typing) bool { return e.UserID == "alice" && e.State == parley.TypingStop })

	// Read state and unread counts: bob has unread messages, reads all, alice sees it.
	rs, err := bob.ReadState(ctx, ch.ID)
	if err != nil || rs.UnreadCount == 0 {
		t.Fatalf("expected unread messages for bob, got %+v %v", rs, err)
	}
	last := fwd[35].Seq
	pos, err := bobRT.MarkRead(ctx, ch.ID, last)
	if err != nil || pos != last {
		t.Fatalf("expected bob's read position at %d, got %d %v", last, pos, err)
	}
	nextEvent(t, aliceRT, "read.updated for bob", func(e *parley.ReadUpdated) bool { return e.UserID == "bob" && e.LastReadSeq == last })
	nextEvent(t, bobRT, "unread.updated 0", func(e *parley.UnreadUpdated) bool { return e.ChannelID == ch.ID && e.UnreadCount == 0 })
	if u, ok := bobRT.Unread(ch.ID); !ok || u.UnreadCount != 0 {
		t.Fatalf("expected the tracked unread count 0, got %+v %v", u, ok)
	}
	chans, err := bob.ListChannels(ctx)
	if err != nil || len(chans) != 1 || chans[0].UnreadCount != 0 || chans[0].LastReadSeq != last {
		t.Fatalf("expected one channel read up to %d, got %+v %v", last, chans, err)
	}

	// Typed errors: carol (signed in with a development token) is not a member.
	dev, err := parley.RequestDevToken(ctx, srv.URL, parley.DevTokenParams{UserID: "carol", TTL: time.Hour})
	if err != nil || dev.UserID != "carol" || dev.Token == "" || time.Until(dev.ExpiresAt) > time.Hour+time.Minute {
		t.Fatalf("expected a one-hour development token for carol, got %+v %v", dev, err)
	}
	carol, err := parley.New(srv.URL, parley.WithToken(dev.Token))
	if err != nil {
		t.Fatal(err)
	}
	_, err = carol.History(ctx, ch.ID, parley.HistoryQuery{})
	var perr *parley.Error
	if !errors.Is(err, parley.ErrNotAMember) || !errors.As(err, &perr) || perr.Status != 403 || perr.RequestID == "" {
		t.Fatalf("expected not_a_member (403, with a request id), got %#v", err)
	}
	carolRT := connect(t, carol)
	if _, err := carolRT.Subscribe(ctx, ch.ID); !errors.Is(err, parley.ErrNotAMember) {
		t.Fatalf("expected a refused subscribe with not_a_member, got %v", err)
	}

	// Presence: alice leaves; after the grace period bob sees her offline with last_seen.
	_ = aliceRT.Close()
	off := nextEvent(t, bobRT, "alice offline", func(e *parley.PresenceChanged) bool {
		return e.UserID == "alice" && e.Status == parley.StatusOffline
	})
	if off.LastSeen == nil {
		t.Fatalf("expected last_seen on offline, got %+v", off)
	}
	ps, err := bob.PresenceOf(ctx, []string{"alice", "nobody"})
	if err != nil || len(ps) != 1 || ps[0].Status != parley.StatusOffline {
		t.Fatalf("expected only alice, offline, in the bulk query, got %+v %v", ps, err)
	}
}
