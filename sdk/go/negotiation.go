package parley

// Perfect negotiation of a Call's peers: PeerConnections, offers and answers, trickled
// candidates, rollbacks on glare, ICE restarts, refused signals. Everything here runs on the
// call's goroutine.

import (
	"strings"

	"github.com/pion/webrtc/v4"
)

// peer returns the peer facing id, creating its PeerConnection if needed. offerer says whether
// this side will make the first offer (then receive-only transceivers and data channels are
// added before it).
func (c *Call) peer(id string, role NegotiationRole, offerer bool) (*Peer, error) {
	c.mu.Lock()
	if p, ok := c.peers[id]; ok {
		c.mu.Unlock()
		return p, nil
	}
	c.mu.Unlock()
	pc, err := c.api.NewPeerConnection(c.rtc)
	if err != nil {
		return nil, err
	}
	p := &Peer{ParticipantID: id, Role: role, pc: pc, call: c}
	pc.OnNegotiationNeeded(func() { c.inbox.push(callInput{negotiate: p}) })
	pc.OnICECandidate(func(cand *webrtc.ICECandidate) {
		s := ""
		if cand != nil {
			s = cand.ToJSON().Candidate
		}
		c.inbox.push(callInput{candidate: p, cand: s})
	})
	pc.OnICEConnectionStateChange(func(s webrtc.ICEConnectionState) {
		if s == webrtc.ICEConnectionStateFailed {
			c.inbox.push(callInput{restart: p})
		}
	})
	pc.OnConnectionStateChange(func(s webrtc.PeerConnectionState) {
		if c.cfg.onPeerState != nil {
			c.cfg.onPeerState(p, s)
		}
	})
	pc.OnTrack(func(t *webrtc.TrackRemote, r *webrtc.RTPReceiver) {
		if c.cfg.onTrack != nil {
			c.cfg.onTrack(p, t, r)
		} else {
			go drainTrack(t)
		}
	})
	pc.OnDataChannel(func(dc *webrtc.DataChannel) {
		if c.cfg.onDataChannel != nil {
			c.cfg.onDataChannel(p, dc)
		}
	})
	c.mu.Lock()
	c.peers[id] = p
	tracks := append([]webrtc.TrackLocal(nil), c.tracks...)
	c.mu.Unlock()
	if offerer {
		if err := c.prepare(p, tracks); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// prepare adds the local tracks, receive-only transceivers and data channels to a new peer.
func (c *Call) prepare(p *Peer, tracks []webrtc.TrackLocal) error {
	for _, t := range tracks {
		if err := p.addTrack(t); err != nil {
			return err
		}
	}
	for _, kind := range c.cfg.recvKinds {
		has := false
		for _, tr := range p.pc.GetTransceivers() {
			if tr.Kind() == kind {
				has = true
			}
		}
		if !has {
			if _, err := p.pc.AddTransceiverFromKind(kind, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}); err != nil {
				return err
			}
		}
	}
	p.dcOpened = true
	for _, label := range c.cfg.dataChannels {
		dc, err := p.pc.CreateDataChannel(label, nil)
		if err != nil {
			return err
		}
		if c.cfg.onDataChannel != nil {
			c.cfg.onDataChannel(p, dc)
		}
	}
	return nil
}

func (p *Peer) addTrack(t webrtc.TrackLocal) error {
	sender, err := p.pc.AddTrack(t)
	if err != nil {
		return err
	}
	// Read RTCP so that the interceptors (NACK, reports) work.
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, _, err := sender.Read(buf); err != nil {
				return
			}
		}
	}()
	return nil
}

func drainTrack(t *webrtc.TrackRemote) {
	buf := make([]byte, 1500)
	for {
		if _, _, err := t.Read(buf); err != nil {
			return
		}
	}
}

// offer makes and sends an offer to p, if the pair is stable and the call attached.
func (c *Call) offer(p *Peer) {
	c.mu.Lock()
	conn := c.attached
	_, present := c.peers[p.ParticipantID]
	c.mu.Unlock()
	if conn == nil || !present {
		return
	}
	if p.pc.SignalingState() != webrtc.SignalingStateStable {
		// pion can neither replace an outstanding offer nor create one while answering: a
		// negotiation still needed is asked again by pion once stable, and a restart still due
		// is offered by settled.
		return
	}
	restart := p.restartPending
	// With ICERestart, CreateOffer restarts the ICE agent at once (new credentials), so it is
	// only called when the offer can be set right after.
	offer, err := p.pc.CreateOffer(&webrtc.OfferOptions{ICERestart: restart})
	if err != nil {
		c.rt.cfg.logger.Warn("parley: create offer", "err", err)
		return
	}
	if err := p.pc.SetLocalDescription(offer); err != nil {
		c.rt.cfg.logger.Warn("parley: set local offer", "err", err)
		return
	}
	p.restartPending = false
	p.offers++
	p.offerRestart = restart
	gen := p.offers
	payload := map[string]any{"kind": "offer", "sdp": offer.SDP}
	if restart {
		payload["ice_restart"] = true
	}
	p.statsMu.Lock()
	p.stats.OffersSent++
	if restart {
		p.stats.ICERestarts++
	}
	p.statsMu.Unlock()
	// outstanding says whether this offer is still the one waiting for an answer.
	outstanding := func() bool {
		return p.offers == gen && p.pc.SignalingState() == webrtc.SignalingStateHaveLocalOffer
	}
	c.sendSignal(conn, p, payload, func(f *frame) {
		switch {
		case f.Type == "ack" && f.RolledBack != nil && *f.RolledBack:
			// Glare lost: the server dropped this offer; the peer's offer, which we have or will
			// have received, is answered instead.
			c.inbox.push(callInput{fn: func() {
				if outstanding() {
					c.rollbackLocal(p)
				}
			}})
		case f.Type == "error" && f.Reason == "ice_restart_required":
			c.inbox.push(callInput{fn: func() {
				if outstanding() {
					c.rollbackLocal(p)
				}
				p.restartPending = true
				c.offer(p)
			}})
		case f.Type == "error":
			c.signalRefused(p, "offer", f)
		}
	})
}

// settled runs when the pair is back to stable: an ICE restart that could not be offered
// meanwhile (an ICE failure during an exchange, a restart offer rolled back by glare) is offered
// now.
func (c *Call) settled(p *Peer) {
	if p.restartPending && p.pc.SignalingState() == webrtc.SignalingStateStable {
		c.offer(p)
	}
}

// signalRefused handles a refused signal: a negotiation rule names itself in the error's Reason
// (peer_gone); the refusals of the call-membership check are told by their code or message.
func (c *Call) signalRefused(p *Peer, kind string, f *frame) {
	err := f.asError()
	msg := err.Message
	switch {
	case err.Code == "forbidden" || err.Code == "not_a_member" || err.Code == "not_found" ||
		strings.Contains(msg, "call has ended"):
		// This participant is no longer in the call.
		c.rt.cfg.logger.Warn("parley: signal refused; leaving the call", "kind", kind, "err", err)
		go c.close()
	case err.Reason == "peer_gone" || strings.Contains(msg, "is not a participant of this call"):
		c.inbox.push(callInput{fn: func() { c.dropPeer(p.ParticipantID) }})
	default:
		c.rt.cfg.logger.Info("parley: signal refused", "kind", kind, "peer", p.ParticipantID, "err", err)
	}
}

// dropPeer closes and forgets the connection to a participant who left.
func (c *Call) dropPeer(id string) {
	c.mu.Lock()
	p := c.peers[id]
	delete(c.peers, id)
	c.mu.Unlock()
	if p != nil {
		_ = p.pc.Close()
	}
}

// sendSignal sends a call.signal to p without waiting; hook sees the reply.
func (c *Call) sendSignal(conn *wsConn, p *Peer, payload map[string]any, hook func(*frame)) {
	req := map[string]any{"type": "call.signal", "call_id": c.ID, "from": c.ParticipantID, "to": p.ParticipantID, "signal": payload}
	if hook == nil {
		kind, _ := payload["kind"].(string)
		hook = func(f *frame) {
			if f.Type == "error" {
				c.signalRefused(p, kind, f)
			}
		}
	}
	if _, err := conn.send(req, hook); err != nil {
		c.rt.cfg.logger.Info("parley: signal not sent", "kind", payload["kind"], "err", err)
	}
}

func (c *Call) sendCandidate(p *Peer, cand string) {
	c.mu.Lock()
	conn := c.attached
	c.mu.Unlock()
	if conn == nil || p.pc.LocalDescription() == nil {
		return
	}
	if cand == "" {
		c.sendSignal(conn, p, map[string]any{"kind": "end_of_candidates"}, func(*frame) {})
		return
	}
	c.sendSignal(conn, p, map[string]any{"kind": "candidate", "candidate": cand}, nil)
}

// onSignal applies a relayed signal (perfect negotiation).
func (c *Call) onSignal(f *frame) {
	switch f.Type {
	case "call.participant_reconnected":
		if p, ok := c.Peer(f.PartID); ok {
			p.restartPending = true // the next offer to it must restart ICE
		}
		return
	case "call.participant_reconnecting":
		return
	}
	if f.Signal == nil || f.To != c.ParticipantID {
		return
	}
	if f.From == SFUPeerID {
		c.onSFUSignal(f.Signal)
		return
	}
	if _, ok := c.Peer(f.From); !ok && c.Mode() == ModeSFU {
		// Nobody needs a new P2P connection in sfu mode (a late P2P offer of a participant who
		// has not escalated yet goes unanswered; it escalates too).
		return
	}
	role := f.Role
	if role == "" {
		role = Polite
	}
	sig := f.Signal
	p, err := c.peer(f.From, role, false)
	if err != nil {
		c.rt.cfg.logger.Warn("parley: peer connection", "err", err)
		return
	}
	switch sig.Kind {
	case "offer":
		collision := p.pc.SignalingState() != webrtc.SignalingStateStable
		p.ignoreOffer = role == Impolite && collision
		if p.ignoreOffer {
			return
		}
		if collision {
			c.rollbackLocal(p)
		}
		if err := p.pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeOffer, SDP: sig.SDP}); err != nil {
			c.rt.cfg.logger.Warn("parley: remote offer", "err", err)
			return
		}
		c.flushCandidates(p)
		if sig.ICERestart {
			p.restartPending = false // this exchange restarts ICE for the pair
		}
		// Publish what this side has on the transceivers the offer created.
		c.mu.Lock()
		tracks := append([]webrtc.TrackLocal(nil), c.tracks...)
		c.mu.Unlock()
		for _, t := range tracks {
			if !p.sends(t) {
				_ = p.addTrack(t)
			}
		}
		if !p.hasDataChannels() {
			for _, label := range c.cfg.dataChannels {
				if dc, err := p.pc.CreateDataChannel(label, nil); err == nil && c.cfg.onDataChannel != nil {
					c.cfg.onDataChannel(p, dc)
				}
			}
			p.markDataChannels()
		}
		answer, err := p.pc.CreateAnswer(nil)
		if err != nil {
			c.rt.cfg.logger.Warn("parley: create answer", "err", err)
			return
		}
		if err := p.pc.SetLocalDescription(answer); err != nil {
			c.rt.cfg.logger.Warn("parley: set local answer", "err", err)
			return
		}
		p.statsMu.Lock()
		p.stats.AnswersSent++
		p.statsMu.Unlock()
		c.mu.Lock()
		conn := c.attached
		c.mu.Unlock()
		if conn != nil {
			c.sendSignal(conn, p, map[string]any{"kind": "answer", "sdp": answer.SDP}, nil)
		}
		c.settled(p)
	case "answer":
		if p.pc.SignalingState() != webrtc.SignalingStateHaveLocalOffer {
			return
		}
		if err := p.pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: sig.SDP}); err != nil {
			c.rt.cfg.logger.Warn("parley: remote answer", "err", err)
			return
		}
		p.offerRestart = false
		c.flushCandidates(p)
		c.settled(p)
	case "candidate":
		if p.ignoreOffer {
			return
		}
		if p.pc.RemoteDescription() == nil {
			p.pendingCands = append(p.pendingCands, sig.Candidate)
			return
		}
		if err := p.pc.AddICECandidate(webrtc.ICECandidateInit{Candidate: sig.Candidate}); err != nil {
			c.rt.cfg.logger.Info("parley: remote candidate", "err", err)
		}
	case "rollback":
		if p.pc.SignalingState() == webrtc.SignalingStateHaveRemoteOffer {
			c.rollbackRemote(p)
			c.settled(p)
		}
	}
}

func (c *Call) flushCandidates(p *Peer) {
	for _, cand := range p.pendingCands {
		_ = p.pc.AddICECandidate(webrtc.ICECandidateInit{Candidate: cand})
	}
	p.pendingCands = nil
}

// rollbackLocal withdraws this side's outstanding offer: it lost a glare, or the server forgot
// it (a rejoin resets the pair). pion (v4) implements no rollback, neither local nor remote, so
// when a real rollback is refused the offer is closed instead with the description last
// negotiated with the peer, applied as its answer: the session stays as negotiated (the same
// transports, transceivers and remote ICE credentials). The peer's offer, applied next, sets
// what it changes. A restart the withdrawn offer carried is still due (see settled).
func (c *Call) rollbackLocal(p *Peer) {
	if p.pc.SignalingState() != webrtc.SignalingStateHaveLocalOffer {
		return
	}
	restart := p.offerRestart
	p.offerRestart = false
	if restart {
		p.restartPending = true
	}
	sdp := ""
	if d := p.pc.PendingLocalDescription(); d != nil {
		sdp = d.SDP
	}
	if err := p.pc.SetLocalDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeRollback, SDP: sdp}); err == nil {
		return
	}
	last := p.pc.CurrentRemoteDescription()
	if last == nil {
		// The first offer to the peer: nothing to go back to.
		c.rt.cfg.logger.Warn("parley: cannot withdraw the first offer to a peer (pion has no rollback)", "peer", p.ParticipantID)
		return
	}
	if err := p.pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: last.SDP}); err != nil {
		c.rt.cfg.logger.Warn("parley: rollback", "err", err)
	}
}

// rollbackRemote drops the peer's offer that this side has applied but not answered (the peer
// rolled it back, or the server forgot it on a rejoin). Without rollback in pion, the offer is
// answered locally and the answer never sent; the next offer restarts ICE, so that both sides
// agree on the ICE credentials again whatever that offer had changed.
func (c *Call) rollbackRemote(p *Peer) {
	if p.pc.SignalingState() != webrtc.SignalingStateHaveRemoteOffer {
		return
	}
	sdp := ""
	if d := p.pc.PendingRemoteDescription(); d != nil {
		sdp = d.SDP
	}
	if err := p.pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeRollback, SDP: sdp}); err == nil {
		return
	}
	p.restartPending = true
	answer, err := p.pc.CreateAnswer(nil)
	if err == nil {
		err = p.pc.SetLocalDescription(answer)
	}
	if err != nil {
		c.rt.cfg.logger.Warn("parley: remote rollback", "err", err)
	}
}

// onEvent handles the channel events of the call: a participant leaving closes its peer; the
// end of the call closes everything.
func (c *Call) onEvent(ev ChannelEvent) {
	switch e := ev.(type) {
	case *CallParticipantJoined:
		if e.Participant.ParticipantID != c.ParticipantID {
			c.mu.Lock()
			c.present[e.Participant.ParticipantID] = true
			c.mu.Unlock()
		}
	case *CallParticipantLeft:
		if e.ParticipantID == c.ParticipantID {
			go c.close()
			return
		}
		c.mu.Lock()
		delete(c.present, e.ParticipantID)
		c.mu.Unlock()
		c.dropPeer(e.ParticipantID)
	case *CallEnded:
		go c.close()
	}
}

// sends reports whether p already sends t.
func (p *Peer) sends(t webrtc.TrackLocal) bool {
	for _, s := range p.pc.GetSenders() {
		if s.Track() == t {
			return true
		}
	}
	return false
}

// Data channels of the call's configuration are opened once per peer.
func (p *Peer) hasDataChannels() bool {
	return p.stats.AnswersSent > 0 || p.stats.OffersSent > 0 || p.dcOpened
}

func (p *Peer) markDataChannels() { p.dcOpened = true }
