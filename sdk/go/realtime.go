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
//     or live delivery skips a seq, the missing events are read from storage (announced by a
//     Gap event).
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
	url       string // base URL of the current (or last attempted) connection
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

// URL returns the base URL of the current (or last, or being attempted) connection: with several
// addresses (WithURLs), which one the client is on.
func (rt *Realtime) URL() string {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.url
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
		base := rt.client.addrs.current()
		rt.mu.Lock()
		rt.url = base.String()
		rt.mu.Unlock()
		conn, err := rt.dial(rt.ctx, base)
		if err == nil {
			attempt = 0
			err = rt.serve(conn)
		}
		if rt.ctx.Err() != nil {
			break
		}
		// Whatever ended it (the node died, drains, or the path to it broke), the next attempt
		// goes to the next address of the deployment; with one address this changes nothing.
		rt.client.addrs.failed(base)
		if rt.fatal(err) {
			// Final: waiting sends and subscribes fail with the cause, Events() closes.
			rt.cfg.logger.Warn("parley: giving up", "err", err)
			rt.setState(StateDisconnected, err)
			rt.outbox.failAll(err)
			rt.cancel()
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
		if errors.Is(err, errServerDraining) {
			delay = 0 // the server's hint was the delay
		}
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
