package parley

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"
)

// State is the state of a Realtime client's connection.
type State int32

const (
	// StateConnecting: the first connection is being made.
	StateConnecting State = iota
	// StateConnected: authenticated, channels resumed or subscribed, the outbox flowing.
	StateConnected
	// StateReconnecting: the connection was lost; a new one is being made (with backoff).
	StateReconnecting
	// StateDisconnected: closed by Close, or given up after a fatal error (see Err). Final.
	StateDisconnected
)

func (s State) String() string {
	switch s {
	case StateConnecting:
		return "connecting"
	case StateConnected:
		return "connected"
	case StateReconnecting:
		return "reconnecting"
	case StateDisconnected:
		return "disconnected"
	}
	return "unknown"
}

// StateChange is one transition of the connection state. Err says why the connection was lost
// (on Reconnecting and Disconnected), when known.
type StateChange struct {
	From, To State
	Err      error
}

// Realtime is a WebSocket connection to Parley that survives network faults. It is safe for
// concurrent use.
//
// Guarantees:
//   - The events of a subscribed channel are delivered on Events() in increasing seq order,
//     each seq at most once, across reconnects: a reconnect resumes every channel from the last
//     delivered seq (the server replays what was missed), and when the server refuses a resume
//     or live delivery skips a seq, the missing messages are fetched from history (announced by
//     a Gap event).
//   - Sends go through an outbox with a client_msg_id chosen by the SDK: a send made while
//     offline waits, a send whose acknowledgement was lost is retried on the next connection
//     with the same key, and the server keeps the first copy, so each message appears once.
//     Sends are acknowledged one at a time, so they are committed in the order they were made.
type Realtime struct {
	client *Client
	cfg    realtimeConfig
	ctx    context.Context
	cancel context.CancelFunc
	events chan Event
	// dispatch is what the dispatcher goroutine delivers, in order: frames from the reader
	// and markers from the connection loop.
	dispatch *queue[dispatchItem]
	outbox   *outbox
	wg       sync.WaitGroup

	mu        sync.Mutex
	state     State
	err       error
	conn      *wsConn
	connReady chan struct{} // closed when the state becomes Connected; replaced on loss
	sessionID string
	welcome   Welcome
	channels  map[string]*channelState
	calls     map[string]*Call
	handlers  []func(StateChange)
	unread    map[string]UnreadUpdated
	typingAt  map[string]time.Time
	// dropFrame, set only by tests, discards frames before routing (a lost live event).
	dropFrame func(*frame) bool
}

// channelState is what the client knows of a subscribed channel.
type channelState struct {
	// lastSeq is the seq of the last event delivered (valid once known).
	lastSeq uint64
	known   bool
	// since, when set, asks that the first subscribe deliver history after this seq.
	since *uint64
	ready chan subscribeResult
}

type subscribeResult struct {
	seq uint64
	err error
}

// RealtimeOption configures a Realtime client.
type RealtimeOption func(*realtimeConfig)

type realtimeConfig struct {
	backoffMin, backoffMax time.Duration
	dialTimeout            time.Duration
	requestTimeout         time.Duration
	keepalive              time.Duration
	eventBuffer            int
	retryOnAuthError       bool
	logger                 *slog.Logger
	handlers               []func(StateChange)
	readLimit              int64
}

// WithBackoff sets the reconnect delays: the first retry waits up to min, each further one
// twice as long up to max, with full jitter (defaults 250 ms and 10 s). A delay the server asks
// for (Retry-After on the upgrade, retry_after_ms) is always honoured.
func WithBackoff(min, max time.Duration) RealtimeOption {
	return func(c *realtimeConfig) { c.backoffMin, c.backoffMax = min, max }
}

// WithDialTimeout bounds one connection attempt, upgrade and welcome included (default 10 s).
func WithDialTimeout(d time.Duration) RealtimeOption {
	return func(c *realtimeConfig) { c.dialTimeout = d }
}

// WithRequestTimeout bounds the wait for the reply to one request on a live connection; a
// connection that does not answer in time is considered dead and replaced (default 15 s).
func WithRequestTimeout(d time.Duration) RealtimeOption {
	return func(c *realtimeConfig) { c.requestTimeout = d }
}

// WithKeepalive sets how often the client pings the server to detect a dead connection
// (default: the server's heartbeat interval).
func WithKeepalive(d time.Duration) RealtimeOption {
	return func(c *realtimeConfig) { c.keepalive = d }
}

// WithEventBuffer sets the capacity of the Events() channel (default 256). When it is full,
// delivery waits; the socket keeps being read meanwhile.
func WithEventBuffer(n int) RealtimeOption {
	return func(c *realtimeConfig) { c.eventBuffer = n }
}

// WithRetryOnAuthError keeps reconnecting after the server refuses the token (useful with a
// TokenSource that refreshes it). By default a refused token is fatal: the client becomes
// Disconnected and Err returns the *Error.
func WithRetryOnAuthError(retry bool) RealtimeOption {
	return func(c *realtimeConfig) { c.retryOnAuthError = retry }
}

// WithLogger sets where the client logs connection faults (default: discarded).
func WithLogger(l *slog.Logger) RealtimeOption {
	return func(c *realtimeConfig) { c.logger = l }
}

// WithStateHandler registers fn for every state change from the very first one. fn runs on the
// connection's goroutine and must not block.
func WithStateHandler(fn func(StateChange)) RealtimeOption {
	return func(c *realtimeConfig) { c.handlers = append(c.handlers, fn) }
}

// Connect opens a Realtime client and waits until it is connected, ctx is done, or the first
// attempt fails fatally (a refused token). ctx bounds only this wait: the client lives until
// Close. On error the client is closed.
func (c *Client) Connect(ctx context.Context, opts ...RealtimeOption) (*Realtime, error) {
	rt := c.Realtime(opts...)
	if err := rt.WaitConnected(ctx); err != nil {
		rt.Close()
		return nil, err
	}
	return rt, nil
}

// Realtime starts a Realtime client that connects in the background; watch its state with
// WithStateHandler, OnStateChange or WaitConnected.
func (c *Client) Realtime(opts ...RealtimeOption) *Realtime {
	cfg := realtimeConfig{
		backoffMin:     250 * time.Millisecond,
		backoffMax:     10 * time.Second,
		dialTimeout:    10 * time.Second,
		requestTimeout: 15 * time.Second,
		eventBuffer:    256,
		readLimit:      8 << 20,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.logger == nil {
		cfg.logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	rt := &Realtime{
		client:    c,
		cfg:       cfg,
		ctx:       ctx,
		cancel:    cancel,
		events:    make(chan Event, cfg.eventBuffer),
		dispatch:  newQueue[dispatchItem](),
		outbox:    newOutbox(),
		state:     StateConnecting,
		connReady: make(chan struct{}),
		channels:  map[string]*channelState{},
		calls:     map[string]*Call{},
		handlers:  cfg.handlers,
		unread:    map[string]UnreadUpdated{},
		typingAt:  map[string]time.Time{},
	}
	rt.wg.Add(2)
	go rt.run()
	go rt.dispatchLoop()
	return rt
}

// Events is where every event is delivered, in order. It is closed after Close.
func (rt *Realtime) Events() <-chan Event { return rt.events }

// State returns the current connection state.
func (rt *Realtime) State() State {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.state
}

// Err returns why the client became Disconnected (nil after Close).
func (rt *Realtime) Err() error {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.err
}

// Welcome returns the welcome of the current (or last) connection.
func (rt *Realtime) Welcome() Welcome {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.welcome
}

// UserID returns the authenticated user's id (empty before the first connection).
func (rt *Realtime) UserID() string { return rt.Welcome().UserID }

// OnStateChange registers fn for every later state change; fn runs on the connection's
// goroutine and must not block. The returned function unregisters it.
func (rt *Realtime) OnStateChange(fn func(StateChange)) (unregister func()) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	rt.handlers = append(rt.handlers, fn)
	idx := len(rt.handlers) - 1
	return func() {
		rt.mu.Lock()
		defer rt.mu.Unlock()
		if idx < len(rt.handlers) {
			rt.handlers[idx] = nil
		}
	}
}

// WaitConnected waits until the client is connected. It returns the client's error if it is
// Disconnected, or ctx's.
func (rt *Realtime) WaitConnected(ctx context.Context) error {
	for {
		rt.mu.Lock()
		state, ready, err := rt.state, rt.connReady, rt.err
		rt.mu.Unlock()
		switch state {
		case StateConnected:
			return nil
		case StateDisconnected:
			if err == nil {
				err = ErrClosed
			}
			return err
		}
		select {
		case <-ready:
		case <-ctx.Done():
			return ctx.Err()
		case <-rt.ctx.Done():
		}
	}
}

// Close ends the connection and stops reconnecting. Sends still in the outbox fail with
// ErrClosed; Events() is closed. Calls joined through this client are left first (best effort).
func (rt *Realtime) Close() error {
	rt.mu.Lock()
	calls := make([]*Call, 0, len(rt.calls))
	for _, c := range rt.calls {
		calls = append(calls, c)
	}
	rt.mu.Unlock()
	for _, c := range calls {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_ = c.Leave(ctx)
		cancel()
	}
	rt.cancel()
	rt.mu.Lock()
	conn := rt.conn
	rt.mu.Unlock()
	if conn != nil {
		conn.close(1000, "client closing")
	}
	rt.wg.Wait()
	rt.outbox.failAll(ErrClosed)
	return nil
}

// setState records a transition and tells the handlers.
func (rt *Realtime) setState(to State, cause error) {
	rt.mu.Lock()
	from := rt.state
	if from == to || from == StateDisconnected {
		rt.mu.Unlock()
		return
	}
	rt.state = to
	if to == StateConnected {
		close(rt.connReady)
	} else if from == StateConnected {
		rt.connReady = make(chan struct{})
	}
	if to == StateDisconnected {
		rt.err = cause
		select {
		case <-rt.connReady:
		default:
			close(rt.connReady)
		}
	}
	handlers := append([]func(StateChange){}, rt.handlers...)
	rt.mu.Unlock()
	change := StateChange{From: from, To: to, Err: cause}
	for _, h := range handlers {
		if h != nil {
			h(change)
		}
	}
}

// run is the connection loop: dial, set up, serve until the connection ends, back off, again.
func (rt *Realtime) run() {
	defer rt.wg.Done()
	attempt := 0
	for rt.ctx.Err() == nil {
		conn, err := rt.dial(rt.ctx)
		if err == nil {
			attempt = 0
			err = rt.serve(conn)
		}
		if rt.ctx.Err() != nil {
			break
		}
		if rt.fatal(err) {
			rt.cfg.logger.Warn("parley: giving up", "err", err)
			rt.setState(StateDisconnected, err)
			return
		}
		rt.cfg.logger.Info("parley: connection lost", "err", err, "attempt", attempt)
		rt.mu.Lock()
		ever := rt.sessionID != ""
		rt.mu.Unlock()
		if ever {
			rt.setState(StateReconnecting, err)
		}
		delay := rt.backoff(attempt, err)
		attempt++
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-rt.ctx.Done():
			t.Stop()
		}
	}
	rt.setState(StateDisconnected, nil)
}

// fatal reports whether err ends the client rather than asking for a reconnect.
func (rt *Realtime) fatal(err error) bool {
	if rt.cfg.retryOnAuthError {
		return false
	}
	if IsAuthError(err) {
		return true
	}
	var ce *CloseError
	return errors.As(err, &ce) && (ce.Code == CloseAuthFailed)
}

// backoff is the delay before attempt number attempt (0 = right after a loss): exponential
// with full jitter, never shorter than what the server asked for.
func (rt *Realtime) backoff(attempt int, cause error) time.Duration {
	ceiling := rt.cfg.backoffMin
	for i := 0; i < attempt && ceiling < rt.cfg.backoffMax; i++ {
		ceiling *= 2
	}
	ceiling = min(ceiling, rt.cfg.backoffMax)
	d := time.Duration(rand.Int64N(int64(ceiling) + 1))
	var perr *Error
	if errors.As(cause, &perr) && perr.RetryAfter > d {
		d = perr.RetryAfter
	}
	var ce *CloseError
	if errors.As(cause, &ce) && ce.Code == CloseRateLimitFlood && d < time.Second {
		d = time.Second
	}
	return d
}

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

	if len(resume) > 0 {
		req := map[string]any{"type": "resume", "session_id": prevSession, "channels": resume}
		reply, err := conn.request(rt.ctx, req, rt.resumeHook(conn, resume))
		if err != nil {
			conn.close(1000, "resume failed")
			<-conn.done
			return conn.cause()
		}
		_ = reply
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
	wg.Add(2)
	go func() { defer wg.Done(); rt.outbox.flush(rt, conn) }()
	go func() { defer wg.Done(); rt.keepalive(conn) }()
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
			// each subscribe ack fills the gap from history.
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

// ---- subscriptions ----

// SubscribeOption configures Subscribe.
type SubscribeOption func(*channelState)

// Since asks that events after seq be delivered too: the messages between seq and the
// subscription point are fetched from history and delivered as MessageNew (FromHistory).
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
