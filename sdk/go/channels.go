package parley

// Subscriptions, typing, read receipts, presence and unread counts on a Realtime client.

import (
	"context"
	"errors"
	"time"
)

// SubscribeOption configures Subscribe.
type SubscribeOption func(*channelState)

// Since asks that events after seq be delivered too: the events between seq and the
// subscription point are read from storage and delivered with FromHistory set.
func Since(seq uint64) SubscribeOption {
	return func(st *channelState) { st.since = &seq }
}

// Subscribe subscribes to a channel and returns the seq after which its events are delivered
// live (fetch older messages with History). The subscription is kept across reconnects until
// Unsubscribe. Subscribing again to a subscribed channel returns its last delivered seq.
func (rt *Realtime) Subscribe(ctx context.Context, channelID string, opts ...SubscribeOption) (uint64, error) {
	rt.mu.Lock()
	st, ok := rt.channels[channelID]
	if ok && st.known {
		seq := st.lastSeq
		rt.mu.Unlock()
		return seq, nil
	}
	var conn *wsConn
	if !ok {
		st = &channelState{ready: make(chan subscribeResult, 1)}
		for _, o := range opts {
			o(st)
		}
		rt.channels[channelID] = st
		// A live connection has already listed its channels: subscribe on it here. Without
		// one, the next connection subscribes every channel it finds.
		conn = rt.conn
	}
	ready := st.ready
	rt.mu.Unlock()
	if conn != nil {
		rt.subscribeOn(conn, channelID)
	}
	select {
	case r := <-ready:
		ready <- r // for any other waiter
		return r.seq, r.err
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-rt.ctx.Done():
		return 0, ErrClosed
	}
}

// Unsubscribe stops the delivery of a channel's events.
func (rt *Realtime) Unsubscribe(ctx context.Context, channelID string) error {
	rt.mu.Lock()
	delete(rt.channels, channelID)
	conn := rt.conn
	rt.mu.Unlock()
	if conn == nil {
		return nil
	}
	reply, err := conn.request(ctx, map[string]any{"type": "unsubscribe", "channel_id": channelID}, nil)
	if err != nil {
		if errors.Is(err, errConnLost) {
			return nil // the next connection will not subscribe it
		}
		return err
	}
	if reply.Type == "error" {
		return reply.asError()
	}
	return nil
}

// LastSeq returns the seq of the last event delivered for a subscribed channel.
func (rt *Realtime) LastSeq(channelID string) (uint64, bool) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	st, ok := rt.channels[channelID]
	if !ok || !st.known {
		return 0, false
	}
	return st.lastSeq, true
}

// ---- typing, read receipts, presence ----

// StartTyping tells the channel's other subscribers that the user is typing. Calls closer
// together than the server's typing throttle are not sent (the server would not announce
// them); call it on every keystroke.
func (rt *Realtime) StartTyping(ctx context.Context, channelID string) error {
	rt.mu.Lock()
	throttle := time.Duration(rt.welcome.Limits.TypingThrottleMS) * time.Millisecond
	last, ok := rt.typingAt[channelID]
	if ok && time.Since(last) < throttle/2 {
		rt.mu.Unlock()
		return nil
	}
	rt.typingAt[channelID] = time.Now()
	rt.mu.Unlock()
	_, err := rt.do(ctx, map[string]any{"type": "typing.start", "channel_id": channelID}, true)
	return err
}

// StopTyping clears the user's typing indicator at once (a sent message also clears it).
func (rt *Realtime) StopTyping(ctx context.Context, channelID string) error {
	rt.mu.Lock()
	delete(rt.typingAt, channelID)
	rt.mu.Unlock()
	_, err := rt.do(ctx, map[string]any{"type": "typing.stop", "channel_id": channelID}, true)
	return err
}

// MarkRead moves the user's read position in a channel forward to seq and returns the position
// after the request.
func (rt *Realtime) MarkRead(ctx context.Context, channelID string, seq uint64) (uint64, error) {
	reply, err := rt.do(ctx, map[string]any{"type": "read", "channel_id": channelID, "seq": seq}, true)
	if err != nil {
		return 0, err
	}
	return deref(reply.LastReadSeq), nil
}

// SetAway sets or clears the user's "away" status.
func (rt *Realtime) SetAway(ctx context.Context, away bool) error {
	_, err := rt.do(ctx, map[string]any{"type": "presence.set", "away": away}, true)
	return err
}

// Unread returns the latest unread count pushed by the server for a channel (unread.updated),
// if one arrived on this client.
func (rt *Realtime) Unread(channelID string) (UnreadUpdated, bool) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	u, ok := rt.unread[channelID]
	return u, ok
}

// Client returns the REST client this Realtime client was made from.
func (rt *Realtime) Client() *Client { return rt.client }
