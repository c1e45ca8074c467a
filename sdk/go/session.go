package parley

// One connection's life inside a Realtime client: setting it up (resume or subscribe every
// channel), running the outbox and keepalive on it, and requests that need a live connection.

import (
	"context"
	"errors"
	"sync"
	"time"
)

// serve sets a fresh connection up (resume or subscribe every channel), runs it until it ends
// and returns why it ended.
func (rt *Realtime) serve(conn *wsConn) error {
	rt.mu.Lock()
	if rt.ctx.Err() != nil {
		rt.mu.Unlock()
		conn.close(1000, "client closing")
		return ErrClosed
	}
	rt.conn = conn
	prevSession := rt.sessionID
	rt.sessionID = conn.welcome.SessionID
	rt.welcome = conn.welcome
	var resume []map[string]any
	var fresh []string
	for id, st := range rt.channels {
		if st.known && prevSession != "" {
			resume = append(resume, map[string]any{"channel_id": id, "seq": st.lastSeq})
		} else {
			fresh = append(fresh, id)
		}
	}
	rt.mu.Unlock()
	defer func() {
		rt.mu.Lock()
		if rt.conn == conn {
			rt.conn = nil
		}
		rt.mu.Unlock()
	}()

	// At most Limits.MaxResumeChannels per resume frame (the server refuses more).
	per := conn.welcome.Limits.MaxResumeChannels
	if per <= 0 {
		per = len(resume)
	}
	for len(resume) > 0 {
		part := resume[:min(per, len(resume))]
		resume = resume[len(part):]
		req := map[string]any{"type": "resume", "session_id": prevSession, "channels": part}
		if _, err := conn.request(rt.ctx, req, rt.resumeHook(conn, part)); err != nil {
			conn.close(1000, "resume failed")
			<-conn.done
			return conn.cause()
		}
	}
	for _, id := range fresh {
		rt.subscribeOn(conn, id)
	}
	rt.setState(StateConnected, nil)

	rt.mu.Lock()
	calls := make([]*Call, 0, len(rt.calls))
	for _, c := range rt.calls {
		calls = append(calls, c)
	}
	rt.mu.Unlock()
	for _, c := range calls {
		c.connected(conn)
	}

	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); rt.outbox.flush(rt, conn) }()
	go func() { defer wg.Done(); rt.keepalive(conn) }()
	go func() { defer wg.Done(); rt.refreshToken(conn) }()
	<-conn.done
	wg.Wait()
	return conn.cause()
}

// resumeHook runs in the reader right when the resume ack or error arrives, before any later
// frame, so the dispatcher sees replayed events, then the outcome, then live events.
func (rt *Realtime) resumeHook(conn *wsConn, asked []map[string]any) func(*frame) {
	return func(f *frame) {
		if f.Type == "error" {
			// Resume refused as a whole (another user's session, say): subscribe afresh;
			// each subscribe ack fills the gap from storage.
			rt.cfg.logger.Warn("parley: resume refused", "err", f.asError())
			// Not from the reader's goroutine: a write may wait for the frame budget.
			go func() {
				for _, ch := range asked {
					rt.subscribeOn(conn, ch["channel_id"].(string))
				}
			}()
			return
		}
		for _, r := range f.Resumed {
			switch {
			case r.Replayed:
			case r.Seq != nil:
				rt.dispatch.push(dispatchItem{kind: itemFill, channelID: r.ChannelID, seq: *r.Seq, reason: "resume_refused: " + r.Reason})
			default:
				rt.dispatch.push(dispatchItem{kind: itemSubscribeFailed, channelID: r.ChannelID, err: &Error{Code: "not_a_member", Message: "resume: " + r.Reason}})
			}
		}
	}
}

// subscribeOn sends a subscribe for channelID on conn without waiting; its outcome reaches the
// dispatcher in order with the channel's events.
func (rt *Realtime) subscribeOn(conn *wsConn, channelID string) {
	req := map[string]any{"type": "subscribe", "channel_id": channelID}
	_, _ = conn.send(req, func(f *frame) {
		if f.Type == "error" {
			rt.dispatch.push(dispatchItem{kind: itemSubscribeFailed, channelID: channelID, err: f.asError()})
			return
		}
		rt.dispatch.push(dispatchItem{kind: itemSubscribed, channelID: channelID, seq: deref(f.Seq)})
	})
}

// keepalive pings the server; a connection that does not answer is closed so that the loop
// replaces it.
func (rt *Realtime) keepalive(conn *wsConn) {
	interval := rt.cfg.keepalive
	if interval == 0 {
		interval = time.Duration(conn.welcome.HeartbeatIntervalMS) * time.Millisecond
	}
	if interval <= 0 {
		interval = 25 * time.Second
	}
	timeout := time.Duration(conn.welcome.HeartbeatTimeoutMS) * time.Millisecond / 2
	if timeout <= 0 || timeout > interval {
		timeout = interval
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-conn.done:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(conn.ctx, timeout)
			err := conn.c.Ping(ctx)
			cancel()
			if err != nil {
				conn.fail(err)
				return
			}
		}
	}
}

// refreshToken keeps the connection's token from expiring: ahead of the expiry (a quarter of
// the remaining lifetime, between 1 s and 60 s) it asks the TokenSource for a token and sends
// auth.refresh. It stops when a refresh brings no later expiry (a static token): the server
// then closes the connection at the expiry (4011), and the reconnect asks the TokenSource again.
func (rt *Realtime) refreshToken(conn *wsConn) {
	expiresAt := conn.welcome.TokenExpiresAt
	deadline := time.Now().Add(time.Duration(conn.welcome.TokenExpiresInMS) * time.Millisecond)
	if expiresAt == 0 {
		return // a server that does not state the expiry
	}
	for {
		left := time.Until(deadline)
		ahead := min(60*time.Second, max(time.Second, left/4))
		t := time.NewTimer(left - ahead)
		select {
		case <-conn.done:
			t.Stop()
			return
		case <-t.C:
		}
		newExp, in, err := rt.refreshOnce(conn)
		switch {
		case err == nil && newExp > expiresAt:
			expiresAt = newExp
			deadline = time.Now().Add(in)
		case err == nil:
			return // no later expiry to be had
		default:
			rt.cfg.logger.Warn("parley: token refresh failed", "err", err)
			if time.Until(deadline) < 500*time.Millisecond {
				return // the server closes at the expiry; the reconnect gets a new token
			}
			// Try again a little later, while there is time.
			select {
			case <-conn.done:
				return
			case <-time.After(max(250*time.Millisecond, time.Until(deadline)/4)):
			}
		}
	}
}

// refreshOnce asks the TokenSource for a token and sends it in auth.refresh; returns the new
// expiry (Unix seconds) and the time until it.
func (rt *Realtime) refreshOnce(conn *wsConn) (int64, time.Duration, error) {
	ctx, cancel := context.WithTimeout(conn.ctx, rt.cfg.requestTimeout)
	defer cancel()
	token, err := rt.client.token(ctx)
	if err != nil {
		return 0, 0, err
	}
	reply, err := conn.request(ctx, map[string]any{"type": "auth.refresh", "token": token}, nil)
	if err != nil {
		return 0, 0, err
	}
	if reply.Type == "error" {
		return 0, 0, reply.asError()
	}
	if reply.TokenExpAt == nil || reply.TokenExpIn == nil {
		return 0, 0, errors.New("parley: auth.refresh ack without the new expiry")
	}
	return *reply.TokenExpAt, time.Duration(*reply.TokenExpIn) * time.Millisecond, nil
}

// liveConn waits for a connected state and returns its connection.
func (rt *Realtime) liveConn(ctx context.Context) (*wsConn, error) {
	for {
		if err := rt.WaitConnected(ctx); err != nil {
			return nil, err
		}
		rt.mu.Lock()
		conn := rt.conn
		rt.mu.Unlock()
		if conn != nil {
			return conn, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// do sends a request once connected and returns its ack. An error frame becomes *Error. When
// retry is set, a request cut by a lost connection is sent again on the next one.
func (rt *Realtime) do(ctx context.Context, req map[string]any, retry bool) (*frame, error) {
	for {
		conn, err := rt.liveConn(ctx)
		if err != nil {
			return nil, err
		}
		reply, err := conn.request(ctx, req, nil)
		if err != nil {
			if retry && errors.Is(err, errConnLost) && ctx.Err() == nil {
				continue
			}
			return nil, err
		}
		if reply.Type == "error" {
			e := reply.asError()
			if e.Code == "rate_limited" {
				if err := sleepCtx(ctx, max(e.RetryAfter, 20*time.Millisecond)); err != nil {
					return nil, err
				}
				continue
			}
			return nil, e
		}
		return reply, nil
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
