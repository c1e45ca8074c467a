package parley

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/time/rate"
)

// errConnLost is the cause of requests cut by the end of their connection.
var errConnLost = fmt.Errorf("%w: connection lost", ErrNotConnected)

// errServerDraining ends a connection the client left because the server asked it to (a
// `reconnect` frame): the next connection is made at once, without backoff.
var errServerDraining = fmt.Errorf("%w: the server asked to reconnect (draining)", ErrNotConnected)

// wsConn is one authenticated WebSocket connection: a reader goroutine that routes replies to
// their requests (running their hooks first, in frame order) and everything else to the
// dispatcher or to calls.
type wsConn struct {
	rt      *Realtime
	c       *websocket.Conn
	welcome Welcome
	limiter *rate.Limiter
	ctx     context.Context
	cancel  context.CancelFunc
	done    chan struct{}

	mu      sync.Mutex
	next    uint64
	pending map[string]*pendingRequest
	err     error
	// leaving: the client is leaving on the server's request; the connection's end is
	// errServerDraining whatever the close looked like.
	leaving bool
}

type pendingRequest struct {
	reply chan *frame
	hook  func(*frame)
}

// dial connects to the base URL base, authenticates and reads the welcome.
func (rt *Realtime) dial(ctx context.Context, base *url.URL) (*wsConn, error) {
	dctx, cancel := context.WithTimeout(ctx, rt.cfg.dialTimeout)
	defer cancel()
	u := *base
	u.Path = base.Path + "/v1/ws"
	switch u.Scheme {
	case "https":
		u.Scheme = "wss"
	default:
		u.Scheme = "ws"
	}
	h := http.Header{}
	h.Set("User-Agent", rt.client.userAgent)
	c, resp, err := websocket.Dial(dctx, u.String(), &websocket.DialOptions{
		Subprotocols: []string{"parley.v1"},
		HTTPHeader:   h,
	})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			var body []byte
			if resp.Body != nil {
				body, _ = io.ReadAll(resp.Body)
			}
			return nil, httpError(resp, body)
		}
		return nil, fmt.Errorf("parley: dial: %w", err)
	}
	c.SetReadLimit(rt.cfg.readLimit)
	token, err := rt.client.token(dctx)
	if err != nil {
		c.CloseNow()
		return nil, fmt.Errorf("parley: token: %w", err)
	}
	auth, _ := json.Marshal(map[string]string{"type": "auth", "token": token})
	if err := c.Write(dctx, websocket.MessageText, auth); err != nil {
		c.CloseNow()
		return nil, fmt.Errorf("parley: auth: %w", err)
	}
	for {
		_, data, err := c.Read(dctx)
		if err != nil {
			c.CloseNow()
			if ce := closeError(err); ce != nil {
				return nil, ce
			}
			return nil, fmt.Errorf("parley: waiting for welcome: %w", err)
		}
		f, err := decodeFrame(data)
		if err != nil {
			continue
		}
		switch f.Type {
		case "error":
			c.CloseNow()
			return nil, f.asError()
		case "welcome":
			var w Welcome
			if err := json.Unmarshal(data, &w); err != nil {
				c.CloseNow()
				return nil, fmt.Errorf("parley: bad welcome: %w", err)
			}
			return rt.newConn(c, w), nil
		}
	}
}

func (rt *Realtime) newConn(c *websocket.Conn, w Welcome) *wsConn {
	fps := float64(w.Limits.FramesPerSecond)
	if fps <= 0 {
		fps = 50
	}
	burst := max(1, w.Limits.FrameBurst/2)
	ctx, cancel := context.WithCancel(rt.ctx)
	wc := &wsConn{
		rt:      rt,
		c:       c,
		welcome: w,
		// A margin under the server's budget: a frame over it is refused, and a run of refused
		// frames closes the connection.
		limiter: rate.NewLimiter(rate.Limit(fps*0.9), burst),
		ctx:     ctx,
		cancel:  cancel,
		done:    make(chan struct{}),
		pending: map[string]*pendingRequest{},
	}
	go wc.readLoop()
	return wc
}

// closeError extracts the close code of a connection the server closed.
func closeError(err error) *CloseError {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return &CloseError{Code: int(ce.Code), Reason: ce.Reason}
	}
	return nil
}

// readLoop reads frames until the connection ends.
func (wc *wsConn) readLoop() {
	var err error
	defer func() { wc.fail(err) }()
	for {
		var data []byte
		_, data, err = wc.c.Read(wc.ctx)
		if err != nil {
			if ce := closeError(err); ce != nil {
				err = ce
			}
			return
		}
		f, derr := decodeFrame(data)
		if derr != nil {
			wc.rt.cfg.logger.Warn("parley: undecodable frame", "err", derr)
			continue
		}
		wc.route(f)
	}
}

// route hands one frame to whoever waits for it.
func (wc *wsConn) route(f *frame) {
	rt := wc.rt
	rt.mu.Lock()
	drop := rt.dropFrame
	rt.mu.Unlock()
	if drop != nil && drop(f) {
		return
	}
	switch f.Type {
	case "ack", "error", "pong":
		if f.ID != nil {
			wc.mu.Lock()
			p := wc.pending[*f.ID]
			delete(wc.pending, *f.ID)
			wc.mu.Unlock()
			if p != nil {
				if p.hook != nil {
					p.hook(f)
				}
				p.reply <- f
				return
			}
		}
		if f.Type == "error" {
			rt.cfg.logger.Warn("parley: server error", "err", f.asError())
		}
		return
	case "call.signal":
		if call := rt.call(f.CallID); call != nil {
			call.inbox.push(callInput{signal: f})
		}
		return
	case "call.participant_reconnecting", "call.participant_reconnected":
		if call := rt.call(f.CallID); call != nil {
			call.inbox.push(callInput{signal: f})
		}
	case "call.mode_changed", "call.sfu", "call.active_speaker":
		// SFU mode (call_sfu.go). Notices for one participant stop here; mode changes and
		// the active speaker are delivered as events too.
		if call := rt.call(f.CallID); call != nil {
			call.inbox.push(callInput{sfu: f})
		}
		if f.Type == "call.sfu" {
			return
		}
	case "welcome":
		return
	case "reconnect":
		var delay time.Duration
		if f.DelayMS != nil && *f.DelayMS > 0 {
			delay = time.Duration(*f.DelayMS) * time.Millisecond
		}
		go wc.leaveAfter(delay)
		return
	}
	rt.dispatch.push(dispatchItem{kind: itemFrame, f: f})
}

// leaveAfter leaves a draining server: after the hinted delay (the server jitters it), and once
// the requests in flight are answered (at most 2 s more), it closes the connection with 1000;
// the connection loop reconnects at once and resumes (behind a load balancer, on another node).
func (wc *wsConn) leaveAfter(delay time.Duration) {
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
	case <-wc.done:
		return
	}
	settleBy := time.Now().Add(2 * time.Second)
	for time.Now().Before(settleBy) {
		wc.mu.Lock()
		inFlight := len(wc.pending)
		wc.mu.Unlock()
		if inFlight == 0 {
			break
		}
		select {
		case <-time.After(20 * time.Millisecond):
		case <-wc.done:
			return
		}
	}
	wc.mu.Lock()
	wc.leaving = true
	wc.mu.Unlock()
	_ = wc.c.Close(websocket.StatusNormalClosure, "server asked to reconnect")
	wc.fail(errServerDraining)
}

// fail ends the connection (once) and fails every request waiting for a reply.
func (wc *wsConn) fail(err error) {
	wc.mu.Lock()
	if wc.pending == nil {
		wc.mu.Unlock()
		return
	}
	if err == nil {
		err = errConnLost
	}
	if wc.leaving {
		err = errServerDraining
	}
	wc.err = err
	pending := wc.pending
	wc.pending = nil
	wc.mu.Unlock()
	wc.cancel()
	wc.c.CloseNow()
	for _, p := range pending {
		close(p.reply)
	}
	close(wc.done)
}

// cause is why the connection ended.
func (wc *wsConn) cause() error {
	wc.mu.Lock()
	defer wc.mu.Unlock()
	return wc.err
}

// close ends the connection with a close frame.
func (wc *wsConn) close(code websocket.StatusCode, reason string) {
	go func() {
		_ = wc.c.Close(code, reason)
	}()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-wc.done:
	case <-t.C:
		wc.fail(errConnLost)
	}
}

// send writes a request with a fresh id; its reply (or nil if the connection ends first)
// arrives on the returned channel after hook ran in the reader.
func (wc *wsConn) send(req map[string]any, hook func(*frame)) (<-chan *frame, error) {
	wc.mu.Lock()
	if wc.pending == nil {
		wc.mu.Unlock()
		return nil, errConnLost
	}
	wc.next++
	id := "g" + strconv.FormatUint(wc.next, 10)
	p := &pendingRequest{reply: make(chan *frame, 1), hook: hook}
	wc.pending[id] = p
	wc.mu.Unlock()
	msg := make(map[string]any, len(req)+1)
	for k, v := range req {
		msg[k] = v
	}
	msg["id"] = id
	data, err := json.Marshal(msg)
	if err != nil {
		wc.mu.Lock()
		if wc.pending != nil {
			delete(wc.pending, id)
		}
		wc.mu.Unlock()
		return nil, fmt.Errorf("parley: encoding %v: %w", req["type"], err)
	}
	if err := wc.write(data); err != nil {
		wc.fail(err)
		return nil, errConnLost
	}
	return p.reply, nil
}

// request sends and waits for the reply. A connection lost meanwhile gives errConnLost; a
// reply that does not come within the request timeout ends the connection (it is dead).
func (wc *wsConn) request(ctx context.Context, req map[string]any, hook func(*frame)) (*frame, error) {
	reply, err := wc.send(req, hook)
	if err != nil {
		return nil, err
	}
	t := time.NewTimer(wc.rt.cfg.requestTimeout)
	defer t.Stop()
	select {
	case f, ok := <-reply:
		if !ok {
			return nil, errConnLost
		}
		return f, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.C:
		wc.fail(fmt.Errorf("parley: no reply to %v within %v", req["type"], wc.rt.cfg.requestTimeout))
		return nil, errConnLost
	}
}

// write sends one text frame within the client-side frame budget.
func (wc *wsConn) write(data []byte) error {
	if err := wc.limiter.Wait(wc.ctx); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(wc.ctx, 10*time.Second)
	defer cancel()
	return wc.c.Write(ctx, websocket.MessageText, data)
}
