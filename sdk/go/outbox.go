package parley

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"time"
)

// Outgoing is a message handed to Realtime.Post: it waits in the outbox until the server has
// acknowledged it (or refused it), across reconnects.
type Outgoing struct {
	// ClientMsgID is the idempotency key sent with every attempt.
	ClientMsgID string
	ChannelID   string
	Text        string
	Metadata    json.RawMessage

	done    chan struct{}
	message *Message
	created bool
	err     error
}

// Done is closed when the send is acknowledged or refused.
func (o *Outgoing) Done() <-chan struct{} { return o.done }

// Result returns the committed message, or why the server refused it. Call it after Done.
func (o *Outgoing) Result() (*Message, error) {
	select {
	case <-o.done:
		return o.message, o.err
	default:
		return nil, errors.New("parley: send still pending")
	}
}

// Created reports whether the server created the message on the first attempt that reached it
// (false when an earlier attempt had already committed it). Call it after Done.
func (o *Outgoing) Created() bool {
	<-o.done
	return o.created
}

// Wait waits for the acknowledgement. If ctx ends first, the message stays in the outbox and is
// still sent.
func (o *Outgoing) Wait(ctx context.Context) (*Message, error) {
	select {
	case <-o.done:
		return o.message, o.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// SendOption configures a send.
type SendOption func(*Outgoing)

// WithClientMsgID sets the idempotency key instead of a generated one (to retry a send made by
// an earlier process, for example).
func WithClientMsgID(id string) SendOption {
	return func(o *Outgoing) { o.ClientMsgID = id }
}

// WithMetadata attaches a small JSON object (at most 2 KiB) to the message.
func WithMetadata(m json.RawMessage) SendOption {
	return func(o *Outgoing) { o.Metadata = m }
}

// Post queues a message for sending and returns at once. The outbox sends queued messages in
// order, one at a time, whenever the client is connected, and retries each with the same
// client_msg_id until the server acknowledges or refuses it.
func (rt *Realtime) Post(channelID, text string, opts ...SendOption) *Outgoing {
	o := &Outgoing{ChannelID: channelID, Text: text, done: make(chan struct{})}
	for _, opt := range opts {
		opt(o)
	}
	if o.ClientMsgID == "" {
		o.ClientMsgID = NewClientMsgID()
	}
	if rt.ctx.Err() != nil {
		o.err = rt.Err()
		if o.err == nil {
			o.err = ErrClosed
		}
		close(o.done)
		return o
	}
	rt.outbox.add(o)
	return o
}

// Send queues a message and waits for its acknowledgement. If ctx ends first, Send returns
// ctx's error but the message stays in the outbox and is still sent (see Pending).
func (rt *Realtime) Send(ctx context.Context, channelID, text string, opts ...SendOption) (*Message, error) {
	return rt.Post(channelID, text, opts...).Wait(ctx)
}

// Pending returns the sends not yet acknowledged, oldest first.
func (rt *Realtime) Pending() []*Outgoing {
	return rt.outbox.snapshot()
}

// outbox is the FIFO of unacknowledged sends.
type outbox struct {
	mu    sync.Mutex
	items []*Outgoing
	wake  chan struct{}
	// closed is the error every send fails with once the client ended (set by failAll).
	closed error
}

func newOutbox() *outbox { return &outbox{wake: make(chan struct{}, 1)} }

func (b *outbox) add(o *Outgoing) {
	b.mu.Lock()
	if b.closed != nil {
		// The client ended between Post's check and here: nothing would ever send this.
		o.err = b.closed
		b.mu.Unlock()
		close(o.done)
		return
	}
	b.items = append(b.items, o)
	b.mu.Unlock()
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

func (b *outbox) head() *Outgoing {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.items) == 0 {
		return nil
	}
	return b.items[0]
}

func (b *outbox) snapshot() []*Outgoing {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*Outgoing(nil), b.items...)
}

// complete removes the head o with its outcome.
func (b *outbox) complete(o *Outgoing, m *Message, created bool, err error) {
	b.mu.Lock()
	if len(b.items) > 0 && b.items[0] == o {
		b.items[0] = nil
		b.items = b.items[1:]
	}
	b.mu.Unlock()
	o.message, o.created, o.err = m, created, err
	close(o.done)
}

// failAll ends the outbox: every queued send and every later one fails with err.
func (b *outbox) failAll(err error) {
	b.mu.Lock()
	if b.closed == nil {
		b.closed = err
	}
	err = b.closed
	items := b.items
	b.items = nil
	b.mu.Unlock()
	for _, o := range items {
		o.err = err
		close(o.done)
	}
}

// flush sends the outbox on conn, one message at a time, until conn ends.
func (b *outbox) flush(rt *Realtime, conn *wsConn) {
	for {
		o := b.head()
		if o == nil {
			select {
			case <-b.wake:
				continue
			case <-conn.done:
				return
			}
		}
		req := map[string]any{"type": "message.send", "channel_id": o.ChannelID, "client_msg_id": o.ClientMsgID, "text": o.Text}
		if o.Metadata != nil {
			req["metadata"] = o.Metadata
		}
		reply, err := conn.request(conn.ctx, req, nil)
		if err != nil {
			return // the next connection sends it again, with the same key
		}
		if reply.Type == "error" {
			perr := reply.asError()
			switch perr.Code {
			case "rate_limited", "unavailable", "internal":
				// Not executed (or not committed): try again after the stated delay.
				select {
				case <-time.After(max(perr.RetryAfter, 50*time.Millisecond)):
				case <-conn.done:
					return
				}
				continue
			}
			b.complete(o, nil, false, perr)
			continue
		}
		m, ok := reply.message()
		if !ok {
			b.complete(o, nil, false, errors.New("parley: send ack without a message"))
			continue
		}
		created := reply.Created != nil && *reply.Created
		b.complete(o, &m, created, nil)
	}
}
