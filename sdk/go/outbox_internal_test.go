package parley

import (
	"errors"
	"testing"
	"time"
)

// TestOutboxEndedFailsLaterSends: once the outbox is ended (a fatal error or Close), a send that
// arrives afterwards fails at once with that error instead of waiting for a sender that is gone
// (the race behind a Send that hung after the client gave up on a refused token).
func TestOutboxEndedFailsLaterSends(t *testing.T) {
	b := newOutbox()
	queued := &Outgoing{ChannelID: "ch", Text: "queued", done: make(chan struct{})}
	b.add(queued)
	cause := &Error{Code: "token_invalid", Status: 401}
	b.failAll(cause)
	late := &Outgoing{ChannelID: "ch", Text: "late", done: make(chan struct{})}
	b.add(late)
	for _, o := range []*Outgoing{queued, late} {
		select {
		case <-o.done:
		case <-time.After(time.Second):
			t.Fatalf("%q still waiting after the outbox ended", o.Text)
		}
		if !errors.Is(o.err, cause) {
			t.Fatalf("%q failed with %v, want the cause", o.Text, o.err)
		}
	}
	if n := len(b.snapshot()); n != 0 {
		t.Fatalf("expected nothing queued, got %d", n)
	}
	// A later end (Close) keeps the first cause.
	b.failAll(ErrClosed)
	again := &Outgoing{ChannelID: "ch", Text: "again", done: make(chan struct{})}
	b.add(again)
	if !errors.Is(again.err, cause) {
		t.Fatalf("expected the first cause to stay, got %v", again.err)
	}
}
