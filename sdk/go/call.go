package parley

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/pion/webrtc/v4"
)

// Call is this participant's side of a P2P call: one pion PeerConnection per remote
// participant (a mesh), negotiated through Parley.
//
// Negotiation is WebRTC perfect negotiation with the roles the server assigns (the earlier
// participant of a pair is impolite): a joiner offers to every participant already present;
// adding or removing tracks renegotiates; candidates are trickled; an ICE failure, a reconnect
// of this client (after which the call is attached again on the new connection) or a
// reconnect of the peer restarts ICE. All negotiation runs on one goroutine per call.
type Call struct {
	// ID is the call's id, ChannelID its channel's, ParticipantID this participant's.
	ID            string
	ChannelID     string
	ParticipantID string

	rt     *Realtime
	cfg    callConfig
	api    *webrtc.API
	rtc    webrtc.Configuration
	joined JoinedCall
	inbox  *queue[callInput]
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu     sync.Mutex
	peers  map[string]*Peer
	tracks []webrtc.TrackLocal
	// attached is the connection the participant is attached on (actor-owned, read under mu).
	attached     *wsConn
	everAttached bool
	left         bool
	attachedCh   chan struct{}

	// SFU mode (call_sfu.go).
	mode         CallMode
	sfu          *sfuLink
	sfuJoin      *SFUJoin
	remoteTracks map[string]*RemoteTrack
	speaker      string
	// present is every other participant in the call (for the receive slots to open).
	present map[string]bool
}

// Peer is the connection to one remote participant.
type Peer struct {
	ParticipantID string
	// Role is this participant's role towards the peer.
	Role NegotiationRole
	pc   *webrtc.PeerConnection
	call *Call

	// Negotiation state, owned by the call's goroutine.
	ignoreOffer    bool
	restartPending bool
	// offers counts the offers made; offerRestart says whether the outstanding one (if any)
	// restarts ICE. A glare or a refusal reported for an offer applies only while it is the last.
	offers       uint64
	offerRestart bool
	pendingCands []string
	stats        PeerStats
	statsMu      sync.Mutex
	dcOpened     bool
}

// PeerStats counts a peer's negotiations.
type PeerStats struct {
	OffersSent, AnswersSent, ICERestarts int
}

// PeerConnection returns the pion PeerConnection facing the peer.
func (p *Peer) PeerConnection() *webrtc.PeerConnection { return p.pc }

// Stats returns the peer's negotiation counters.
func (p *Peer) Stats() PeerStats {
	p.statsMu.Lock()
	defer p.statsMu.Unlock()
	return p.stats
}

// CreateDataChannel opens a data channel to this peer (renegotiating if needed).
func (p *Peer) CreateDataChannel(label string, init *webrtc.DataChannelInit) (*webrtc.DataChannel, error) {
	return p.pc.CreateDataChannel(label, init)
}

// callInput is one thing for the call's goroutine to handle.
type callInput struct {
	signal    *frame       // call.signal or call.participant_reconnect(ing|ed)
	event     ChannelEvent // a channel event about this call
	conn      *wsConn      // the client is connected on conn: attach there
	negotiate *Peer        // the peer needs an offer
	candidate *Peer        // a local candidate for the peer (cand; "" = end of candidates)
	cand      string
	restart   *Peer  // restart ICE with the peer
	fn        func() // run on the call's goroutine
	sfu       *frame // call.mode_changed, call.sfu, call.active_speaker
}

// StartCall starts the channel's call (or finds the active one) and joins it.
func (rt *Realtime) StartCall(ctx context.Context, channelID string, opts ...CallOption) (*Call, error) {
	call, err := rt.client.StartCall(ctx, channelID)
	if err != nil {
		return nil, err
	}
	return rt.JoinCall(ctx, call.ID, opts...)
}

// JoinCall joins a call: it joins over REST, subscribes to the call's channel (to learn who
// leaves), attaches the participant to this connection and offers to every participant
// already present. It returns once attached. Keep draining Events(): call events travel there.
func (rt *Realtime) JoinCall(ctx context.Context, callID string, opts ...CallOption) (*Call, error) {
	var cfg callConfig
	for _, o := range opts {
		o(&cfg)
	}
	api, err := cfg.api()
	if err != nil {
		return nil, fmt.Errorf("parley: webrtc setup: %w", err)
	}
	joined, err := rt.client.JoinCallREST(ctx, callID)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithCancel(rt.ctx)
	c := &Call{
		ID:            callID,
		ChannelID:     joined.Call.ChannelID,
		ParticipantID: joined.ParticipantID,
		rt:            rt,
		cfg:           cfg,
		api:           api,
		rtc:           cfg.rtcConfiguration(joined.ICEServers),
		joined:        *joined,
		inbox:         newQueue[callInput](),
		ctx:           cctx,
		cancel:        cancel,
		done:          make(chan struct{}),
		peers:         map[string]*Peer{},
		tracks:        append([]webrtc.TrackLocal(nil), cfg.tracks...),
		attachedCh:    make(chan struct{}),
		mode:          joined.Call.Mode,
		sfuJoin:       joined.SFU,
		remoteTracks:  map[string]*RemoteTrack{},
		present:       map[string]bool{},
	}
	for _, p := range joined.Peers {
		c.present[p.ParticipantID] = true
	}
	rt.mu.Lock()
	rt.calls[callID] = c
	rt.mu.Unlock()
	go c.run()
	if _, err := rt.Subscribe(ctx, c.ChannelID); err != nil {
		_ = c.Leave(context.Background())
		return nil, err
	}
	conn, err := rt.liveConn(ctx)
	if err != nil {
		_ = c.Leave(context.Background())
		return nil, err
	}
	c.connected(conn)
	select {
	case <-c.attachedCh:
		return c, nil
	case <-ctx.Done():
		_ = c.Leave(context.Background())
		return nil, ctx.Err()
	}
}

// call returns the joined call with this id, if any.
func (rt *Realtime) call(id string) *Call {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	return rt.calls[id]
}

// notifyCalls hands a channel event to the call it is about.
func (rt *Realtime) notifyCalls(ev ChannelEvent) {
	var id string
	switch e := ev.(type) {
	case *CallParticipantJoined:
		id = e.CallID
	case *CallParticipantLeft:
		id = e.CallID
	case *CallEnded:
		id = e.CallID
	default:
		return
	}
	if c := rt.call(id); c != nil {
		c.inbox.push(callInput{event: ev})
	}
}

// connected is called when the client is connected on conn: the call attaches there.
func (c *Call) connected(conn *wsConn) {
	c.inbox.push(callInput{conn: conn})
}

// Peers returns the current peers.
func (c *Call) Peers() []*Peer {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*Peer, 0, len(c.peers))
	for _, p := range c.peers {
		out = append(out, p)
	}
	return out
}

// Peer returns the peer facing participantID.
func (c *Call) Peer(participantID string) (*Peer, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.peers[participantID]
	return p, ok
}

// AddTrack publishes a local track to every peer, present and future (renegotiating).
func (c *Call) AddTrack(t webrtc.TrackLocal) error {
	return c.exec(func() error {
		c.mu.Lock()
		c.tracks = append(c.tracks, t)
		peers := c.peerList()
		c.mu.Unlock()
		for _, p := range peers {
			if err := p.addTrack(t); err != nil {
				return err
			}
		}
		return nil
	})
}

// RemoveTrack stops publishing a local track (renegotiating).
func (c *Call) RemoveTrack(t webrtc.TrackLocal) error {
	return c.exec(func() error {
		c.mu.Lock()
		for i, x := range c.tracks {
			if x == t {
				c.tracks = append(c.tracks[:i], c.tracks[i+1:]...)
				break
			}
		}
		peers := c.peerList()
		c.mu.Unlock()
		for _, p := range peers {
			for _, s := range p.pc.GetSenders() {
				if s.Track() == t {
					if err := p.pc.RemoveTrack(s); err != nil {
						return err
					}
				}
			}
		}
		return nil
	})
}

// RestartICE restarts ICE with every peer.
func (c *Call) RestartICE() {
	for _, p := range c.Peers() {
		c.inbox.push(callInput{restart: p})
	}
}

// Leave leaves the call (REST) and closes every PeerConnection.
func (c *Call) Leave(ctx context.Context) error {
	c.mu.Lock()
	if c.left {
		c.mu.Unlock()
		return nil
	}
	c.left = true
	c.mu.Unlock()
	err := c.rt.client.LeaveCall(ctx, c.ID, c.ParticipantID)
	c.close()
	return err
}

// Done is closed when the call is over for this participant (left, ended, or client closed).
func (c *Call) Done() <-chan struct{} { return c.done }

func (c *Call) close() {
	c.cancel()
	<-c.done
	c.rt.mu.Lock()
	if c.rt.calls[c.ID] == c {
		delete(c.rt.calls, c.ID)
	}
	c.rt.mu.Unlock()
}

// exec runs fn on the call's goroutine and returns its error.
func (c *Call) exec(fn func() error) error {
	res := make(chan error, 1)
	c.inbox.push(callInput{fn: func() { res <- fn() }})
	select {
	case err := <-res:
		return err
	case <-c.done:
		return ErrClosed
	}
}

func (c *Call) peerList() []*Peer {
	out := make([]*Peer, 0, len(c.peers))
	for _, p := range c.peers {
		out = append(out, p)
	}
	return out
}

// run is the call's goroutine: every negotiation step happens here, in order.
func (c *Call) run() {
	defer close(c.done)
	defer func() {
		c.mu.Lock()
		peers := c.peerList()
		c.peers = map[string]*Peer{}
		link := c.sfu
		c.sfu = nil
		c.mu.Unlock()
		for _, p := range peers {
			_ = p.pc.Close()
		}
		if link != nil {
			link.closed = true
			_ = link.pc.Close()
		}
	}()
	for {
		in, ok := c.inbox.pop()
		if !ok {
			select {
			case <-c.inbox.wake:
				continue
			case <-c.ctx.Done():
				return
			}
		}
		if c.ctx.Err() != nil {
			return
		}
		c.handle(in)
	}
}

func (c *Call) handle(in callInput) {
	switch {
	case in.fn != nil:
		in.fn()
	case in.conn != nil:
		c.attach(in.conn)
	case in.signal != nil:
		c.onSignal(in.signal)
	case in.event != nil:
		c.onEvent(in.event)
	case in.sfu != nil:
		c.onSFUFrame(in.sfu)
	case in.negotiate != nil:
		c.offer(in.negotiate)
	case in.candidate != nil:
		c.sendCandidate(in.candidate, in.cand)
	case in.restart != nil:
		p := in.restart
		p.restartPending = true
		c.offer(p)
	}
}

// attach attaches the participant on conn. After a reconnect (a second attach), every pair
// restarts ICE; on the first attach the joiner offers to every participant already present.
func (c *Call) attach(conn *wsConn) {
	c.mu.Lock()
	same := c.attached == conn
	c.mu.Unlock()
	if same {
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	reply, err := conn.request(ctx, map[string]any{"type": "call.attach", "call_id": c.ID, "participant_id": c.ParticipantID}, nil)
	cancel()
	if err != nil {
		return // the next connection attaches again
	}
	if reply.Type == "error" {
		// Not found, not a member, or conflict (the participant left — the reconnect grace
		// period passed — or the call ended): this participant is out of the call.
		c.rt.cfg.logger.Warn("parley: call.attach refused; the call is over for this participant", "call", c.ID, "err", reply.asError())
		go c.close()
		return
	}
	c.mu.Lock()
	c.attached = conn
	reattach := c.everAttached
	c.everAttached = true
	peers := c.peerList()
	c.mu.Unlock()
	if !reattach {
		close(c.attachedCh)
		if c.Mode() == ModeSFU {
			// The peers are listed for display only: media goes to the SFU.
			c.startSFU(c.joined.Call.SFUSession)
			return
		}
		for _, jp := range c.joined.Peers {
			p, err := c.peer(jp.ParticipantID, jp.Role, true)
			if err != nil {
				c.rt.cfg.logger.Warn("parley: peer connection", "err", err)
				continue
			}
			c.offer(p)
		}
		return
	}
	for _, p := range peers {
		// The server reset the pair to stable on the rejoin: drop a half-done exchange and
		// offer with new ICE credentials.
		switch p.pc.SignalingState() {
		case webrtc.SignalingStateHaveRemoteOffer:
			c.rollbackRemote(p)
		case webrtc.SignalingStateHaveLocalOffer:
			c.rollbackLocal(p)
		}
		p.restartPending = true
		c.offer(p)
	}
}
