package parley

import (
	"context"
	"errors"
	"time"
)

// What the dispatcher handles, in the order the reader and the connection loop pushed it.
type itemKind int

const (
	// itemFrame: a frame from the server (a channel event or an ephemeral event).
	itemFrame itemKind = iota
	// itemSubscribed: a subscribe ack; live events of the channel follow seq.
	itemSubscribed
	// itemFill: the channel's events up to seq could not be replayed; fill from storage.
	itemFill
	// itemSubscribeFailed: the channel cannot be subscribed (err).
	itemSubscribeFailed
)

type dispatchItem struct {
	kind      itemKind
	f         *frame
	channelID string
	seq       uint64
	reason    string
	err       error
}

// dispatchLoop delivers events in order, keeping each channel's last delivered seq: it drops
// what was already delivered and fills holes from the channel's stored events before going on.
func (rt *Realtime) dispatchLoop() {
	defer rt.wg.Done()
	defer close(rt.events)
	for {
		item, ok := rt.dispatch.pop()
		if !ok {
			select {
			case <-rt.dispatch.wake:
				continue
			case <-rt.ctx.Done():
				return
			}
		}
		switch item.kind {
		case itemFrame:
			if item.f.isChannelEvent() {
				rt.onChannelEvent(item.f.channelEvent())
			} else if item.f.Type == "presence.batch" {
				// Several users' changes coalesced by the server: one PresenceChanged each.
				for _, p := range item.f.Presences {
					rt.onEphemeral(&PresenceChanged{p})
				}
			} else {
				rt.onEphemeral(item.f.ephemeralEvent())
			}
		case itemSubscribed:
			rt.onSubscribed(item.channelID, item.seq)
		case itemFill:
			rt.mu.Lock()
			st := rt.channels[item.channelID]
			var from uint64
			fill := st != nil && st.known && item.seq > st.lastSeq
			if fill {
				from = st.lastSeq
			}
			rt.mu.Unlock()
			if fill {
				rt.fill(item.channelID, from, item.seq, item.reason)
			}
		case itemSubscribeFailed:
			rt.mu.Lock()
			st := rt.channels[item.channelID]
			if st != nil {
				delete(rt.channels, item.channelID)
				select {
				case st.ready <- subscribeResult{err: item.err}:
				default:
				}
			}
			rt.mu.Unlock()
			if st != nil && st.known {
				rt.cfg.logger.Warn("parley: subscription lost", "channel", item.channelID, "err", item.err)
			}
		}
		if rt.ctx.Err() != nil {
			return
		}
	}
}

// emit hands an event to the application, waiting for room.
func (rt *Realtime) emit(ev Event) bool {
	select {
	case rt.events <- ev:
		return true
	case <-rt.ctx.Done():
		return false
	}
}

func (rt *Realtime) onSubscribed(channelID string, seq uint64) {
	rt.mu.Lock()
	st := rt.channels[channelID]
	if st == nil {
		rt.mu.Unlock()
		return
	}
	var from uint64
	var fill bool
	if !st.known {
		if st.since != nil && *st.since < seq {
			from, fill = *st.since, true
		}
		st.known = true
		st.lastSeq = seq
		if fill {
			st.lastSeq = from
		}
	} else if seq > st.lastSeq {
		from, fill = st.lastSeq, true
	}
	rt.mu.Unlock()
	if fill {
		rt.fill(channelID, from, seq, "subscribe")
	}
	rt.mu.Lock()
	if st := rt.channels[channelID]; st != nil {
		select {
		case st.ready <- subscribeResult{seq: seq}:
		default:
		}
	}
	rt.mu.Unlock()
}

// onChannelEvent delivers a persisted event once, in order, filling a hole before it.
func (rt *Realtime) onChannelEvent(ev ChannelEvent) {
	meta := ev.Channel()
	rt.mu.Lock()
	st := rt.channels[meta.ChannelID]
	if st == nil || !st.known || meta.Seq <= st.lastSeq {
		rt.mu.Unlock()
		return
	}
	last := st.lastSeq
	rt.mu.Unlock()
	if meta.Seq > last+1 {
		rt.fill(meta.ChannelID, last, meta.Seq-1, "live_gap")
	}
	rt.deliver(ev)
}

// deliver hands on a channel event whose seq is past the channel's last delivered one (live or
// filled), moving that seq, and forgets the channel when the event ends the subscription.
// It reports whether the dispatcher should go on with the channel: false when the channel is
// gone or the client closed.
func (rt *Realtime) deliver(ev ChannelEvent) bool {
	meta := ev.Channel()
	rt.mu.Lock()
	st := rt.channels[meta.ChannelID]
	if st == nil {
		rt.mu.Unlock()
		return false
	}
	if meta.Seq <= st.lastSeq {
		rt.mu.Unlock()
		return true
	}
	st.lastSeq = meta.Seq
	if rm, ok := ev.(*MemberRemoved); ok && rm.UserID == rt.welcome.UserID {
		delete(rt.channels, meta.ChannelID)
	}
	if _, ok := ev.(*ChannelDeleted); ok {
		delete(rt.channels, meta.ChannelID)
	}
	rt.mu.Unlock()
	rt.notifyCalls(ev)
	return rt.emit(ev)
}

func (rt *Realtime) onEphemeral(ev Event) {
	if u, ok := ev.(*UnreadUpdated); ok {
		rt.mu.Lock()
		rt.unread[u.ChannelID] = *u
		rt.mu.Unlock()
	}
	rt.emit(ev)
}

// fill delivers every event of (from, to] from the channel's stored events
// (GET /v1/channels/{id}/events), in seq order and with FromHistory set, after a Gap notice, and
// moves the channel's last seq to to. It retries failed requests until the client closes; a
// channel the user can no longer read is dropped.
func (rt *Realtime) fill(channelID string, from, to uint64, reason string) {
	if !rt.emit(&Gap{ChannelID: channelID, From: from, To: to, Reason: reason}) {
		return
	}
	after := from
	delay := 50 * time.Millisecond
	for after < to {
		ctx, cancel := context.WithTimeout(rt.ctx, 10*time.Second)
		page, err := rt.client.Events(ctx, channelID, after, 200)
		cancel()
		if err != nil {
			if rt.ctx.Err() != nil {
				return
			}
			if errors.Is(err, ErrNotAMember) || errors.Is(err, ErrNotFound) {
				rt.mu.Lock()
				delete(rt.channels, channelID)
				rt.mu.Unlock()
				return
			}
			rt.cfg.logger.Info("parley: gap fill failed, retrying", "channel", channelID, "err", err)
			if sleepCtx(rt.ctx, delay) != nil {
				return
			}
			delay = min(delay*2, 2*time.Second)
			continue
		}
		delay = 50 * time.Millisecond
		for _, ev := range page.Events {
			meta := ev.Channel()
			if meta.Seq <= after || meta.Seq > to {
				continue
			}
			after = meta.Seq
			meta.FromHistory = true
			if !rt.deliver(ev) {
				return
			}
		}
		if !page.HasMore || len(page.Events) == 0 {
			break
		}
		after = max(after, page.Events[len(page.Events)-1].Channel().Seq)
	}
	rt.mu.Lock()
	if st := rt.channels[channelID]; st != nil && st.lastSeq < to {
		st.lastSeq = to
	}
	rt.mu.Unlock()
}
