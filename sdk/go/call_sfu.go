package parley

// SFU mode of a Call (docs/calls.md, "Calls through the SFU"): one pion PeerConnection to the
// call's SFU, the reserved peer "sfu", on which this client is the only offerer. Local tracks
// are published on sendonly transceivers, remote tracks arrive on recvonly transceivers (receive
// slots) that the SFU binds to tracks by mid. On call.mode_changed the call moves its media to
// the SFU by itself and closes its P2P connections once the SFU connection is up. Everything here
// runs on the call's goroutine, except the accessors, which lock c.mu.

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/pion/webrtc/v4"
)

// SFUPeerID is the participant id of the SFU in call signals.
const SFUPeerID = "sfu"

// RemoteTrack is a track another participant publishes in an SFU call.
type RemoteTrack struct {
	TrackID       string
	ParticipantID string
	Kind          string // "audio" or "video"
	// Subscribed is false after Unsubscribe (everyone is subscribed to everything by default).
	Subscribed bool
	// Mid is the receive slot the track arrives on, while it is bound ("" otherwise).
	Mid string
	// Layer is the simulcast layer the SFU last said it sends ("" unknown or none).
	Layer string
}

// VideoPrefs is what a subscriber wants of one video track in an SFU call.
type VideoPrefs struct {
	// Paused stops the track's video (audio is not affected); false resumes it.
	Paused *bool
	// MaxWidth, MaxHeight: the tile size; the SFU sends the smallest layer at least that large.
	MaxWidth, MaxHeight int
}

// sfuLink is the connection to the SFU.
type sfuLink struct {
	pc             *webrtc.PeerConnection
	session        string
	credential     string
	offerAcked     bool // an offer (with the credential) was accepted
	offering       bool // an offer waits for its answer
	again          bool // negotiate again once answered
	restartPending bool
	closed         bool
}

// Mode returns how the call's media flows now: ModeP2P or ModeSFU.
func (c *Call) Mode() CallMode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mode
}

// SFUConnection returns the PeerConnection to the SFU (nil in P2P mode).
func (c *Call) SFUConnection() *webrtc.PeerConnection {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sfu == nil {
		return nil
	}
	return c.sfu.pc
}

// ActiveSpeaker returns the participant the SFU announced as speaking ("" for nobody).
func (c *Call) ActiveSpeaker() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.speaker
}

// RemoteTracks returns the tracks the others publish in an SFU call.
func (c *Call) RemoteTracks() []RemoteTrack {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]RemoteTrack, 0, len(c.remoteTracks))
	for _, t := range c.remoteTracks {
		out = append(out, *t)
	}
	return out
}

// SFUBinding returns the remote track bound to this client's receive slot mid, if any.
func (c *Call) SFUBinding(mid string) (RemoteTrack, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, t := range c.remoteTracks {
		if t.Mid == mid {
			return *t, true
		}
	}
	return RemoteTrack{}, false
}

// Subscribe receives a track of an SFU call (with video preferences, if any).
func (c *Call) Subscribe(ctx context.Context, trackID string, prefs VideoPrefs) error {
	if err := c.sfuOp(ctx, "subscribe", trackID, prefs); err != nil {
		return err
	}
	c.setSubscribed(trackID, true)
	return nil
}

// Unsubscribe stops receiving a track of an SFU call; its slot is freed.
func (c *Call) Unsubscribe(ctx context.Context, trackID string) error {
	if err := c.sfuOp(ctx, "unsubscribe", trackID, VideoPrefs{}); err != nil {
		return err
	}
	c.setSubscribed(trackID, false)
	return nil
}

// SetVideo pauses or resumes a subscribed video track, or sets the size wanted of it.
func (c *Call) SetVideo(ctx context.Context, trackID string, prefs VideoPrefs) error {
	return c.sfuOp(ctx, "video", trackID, prefs)
}

func (c *Call) setSubscribed(trackID string, on bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := c.remoteTracks[trackID]; t != nil {
		t.Subscribed = on
	}
}

func (c *Call) sfuOp(ctx context.Context, op, trackID string, prefs VideoPrefs) error {
	c.mu.Lock()
	conn, mode := c.attached, c.mode
	c.mu.Unlock()
	if mode != ModeSFU {
		return fmt.Errorf("parley: %s: the call is not in sfu mode", op)
	}
	if conn == nil {
		return ErrNotConnected
	}
	req := map[string]any{"type": "call.sfu", "call_id": c.ID, "participant_id": c.ParticipantID, "op": op, "track_id": trackID}
	if prefs.Paused != nil {
		req["paused"] = *prefs.Paused
	}
	if prefs.MaxWidth > 0 && prefs.MaxHeight > 0 {
		req["max_width"], req["max_height"] = prefs.MaxWidth, prefs.MaxHeight
	}
	reply, err := conn.request(ctx, req, nil)
	if err != nil {
		return err
	}
	if reply.Type == "error" {
		return reply.asError()
	}
	return nil
}

// onSFUFrame handles call.mode_changed, call.sfu and call.active_speaker.
func (c *Call) onSFUFrame(f *frame) {
	switch f.Type {
	case "call.mode_changed":
		c.mu.Lock()
		changed := c.mode != f.Mode
		c.mode = f.Mode
		link := c.sfu
		c.mu.Unlock()
		if changed && c.cfg.onMode != nil {
			c.cfg.onMode(f.Mode)
		}
		if f.Mode == ModeSFU && (link == nil || link.session != f.SFUSession) {
			c.startSFU(f.SFUSession)
		}
	case "call.active_speaker":
		c.mu.Lock()
		c.speaker = f.PartID
		c.mu.Unlock()
		if c.cfg.onSpeaker != nil {
			c.cfg.onSpeaker(f.PartID)
		}
	case "call.sfu":
		if f.PartID != c.ParticipantID {
			return
		}
		c.onSFUNotice(f)
	}
}

func (c *Call) onSFUNotice(f *frame) {
	c.mu.Lock()
	link := c.sfu
	switch f.Event {
	case "track_published":
		if f.Publisher != c.ParticipantID {
			t := c.remoteTracks[f.TrackID]
			if t == nil {
				t = &RemoteTrack{TrackID: f.TrackID, Subscribed: true}
				c.remoteTracks[f.TrackID] = t
			}
			t.ParticipantID, t.Kind = f.Publisher, f.Kind
		}
	case "track_unpublished":
		delete(c.remoteTracks, f.TrackID)
	case "bound":
		for _, t := range c.remoteTracks {
			if t.Mid == f.Mid {
				t.Mid = ""
			}
		}
		t := c.remoteTracks[f.TrackID]
		if t == nil {
			t = &RemoteTrack{TrackID: f.TrackID, ParticipantID: f.Publisher, Subscribed: true}
			c.remoteTracks[f.TrackID] = t
		}
		t.Mid = f.Mid
	case "unbound":
		if t := c.remoteTracks[f.TrackID]; t != nil && t.Mid == f.Mid {
			t.Mid = ""
		}
	case "layer":
		if t := c.remoteTracks[f.TrackID]; t != nil {
			t.Layer = ""
			if f.Layer != nil {
				t.Layer = *f.Layer
			}
		}
	}
	c.mu.Unlock()
	switch f.Event {
	case "renegotiate":
		if link != nil {
			c.addSlots(link, f.Audio, f.Video)
			c.sfuOffer(link)
		}
	case "disconnected":
		if link != nil {
			c.startSFU(link.session)
		}
	}
}

// startSFU opens a connection to the SFU of session (closing a previous one), joining again for
// a credential when the one at hand is for another session or about to expire.
func (c *Call) startSFU(session string) {
	c.mu.Lock()
	cred := c.sfuJoin
	c.mu.Unlock()
	fresh := cred != nil && (session == "" || cred.Session == session) && time.Unix(cred.ExpiresAt, 0).After(time.Now().Add(5*time.Second))
	if !fresh {
		ctx, cancel := context.WithTimeout(c.ctx, 15*time.Second)
		joined, err := c.rt.client.JoinCallREST(ctx, c.ID)
		cancel()
		if err != nil {
			c.rt.cfg.logger.Warn("parley: joining again for the SFU credential", "err", err)
			return
		}
		if joined.SFU == nil {
			c.rt.cfg.logger.Warn("parley: the join answer has no SFU credential", "mode", joined.Call.Mode)
			return
		}
		cred = joined.SFU
		if session == "" {
			session = joined.Call.SFUSession
		}
		c.mu.Lock()
		c.sfuJoin = cred
		c.mu.Unlock()
	}
	if session == "" {
		session = cred.Session
	}
	c.mu.Lock()
	old := c.sfu
	c.sfu = nil
	c.remoteTracks = map[string]*RemoteTrack{}
	others := max(len(c.present), 1)
	tracks := append([]webrtc.TrackLocal(nil), c.tracks...)
	c.mu.Unlock()
	if old != nil {
		old.closed = true
		_ = old.pc.Close()
	}
	pc, err := c.api.NewPeerConnection(c.rtc)
	if err != nil {
		c.rt.cfg.logger.Warn("parley: SFU peer connection", "err", err)
		return
	}
	link := &sfuLink{pc: pc, session: session, credential: cred.Credential}
	pc.OnICECandidate(func(cand *webrtc.ICECandidate) {
		s := ""
		if cand != nil {
			s = cand.ToJSON().Candidate
		}
		c.inbox.push(callInput{fn: func() { c.sfuCandidate(link, s) }})
	})
	pc.OnICEConnectionStateChange(func(s webrtc.ICEConnectionState) {
		if s == webrtc.ICEConnectionStateFailed {
			c.inbox.push(callInput{fn: func() {
				link.restartPending = true
				c.sfuOffer(link)
			}})
		}
	})
	pc.OnConnectionStateChange(func(s webrtc.PeerConnectionState) {
		if c.cfg.onSFUState != nil {
			c.cfg.onSFUState(s)
		}
		if s == webrtc.PeerConnectionStateConnected {
			// The media flows through the SFU now: the mesh is no longer needed.
			c.inbox.push(callInput{fn: func() {
				if c.currentSFU() == link {
					c.closeP2P()
				}
			}})
		}
	})
	pc.OnTrack(func(t *webrtc.TrackRemote, r *webrtc.RTPReceiver) {
		mid := ""
		for _, tr := range pc.GetTransceivers() {
			if tr.Receiver() == r {
				mid = tr.Mid()
			}
		}
		if c.cfg.onSFUTrack != nil {
			c.cfg.onSFUTrack(c, mid, t, r)
		} else {
			go drainTrack(t)
		}
	})
	for _, t := range tracks {
		tr, err := pc.AddTransceiverFromTrack(t, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionSendonly})
		if err != nil {
			c.rt.cfg.logger.Warn("parley: publishing to the SFU", "err", err)
			continue
		}
		go drainRTCP(tr.Sender())
	}
	c.mu.Lock()
	c.sfu = link
	c.mu.Unlock()
	audio, video := others, others
	if s := c.cfg.sfuSlots; s != nil {
		audio, video = s[0], s[1]
	}
	c.addSlots(link, audio, video)
	c.sfuOffer(link)
}

func (c *Call) currentSFU() *sfuLink {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sfu
}

// addSlots adds receive-only transceivers (receive slots).
func (c *Call) addSlots(link *sfuLink, audio, video int) {
	for i := 0; i < audio; i++ {
		if _, err := link.pc.AddTransceiverFromKind(webrtc.RTPCodecTypeAudio, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}); err != nil {
			c.rt.cfg.logger.Warn("parley: SFU audio slot", "err", err)
		}
	}
	for i := 0; i < video; i++ {
		if _, err := link.pc.AddTransceiverFromKind(webrtc.RTPCodecTypeVideo, webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}); err != nil {
			c.rt.cfg.logger.Warn("parley: SFU video slot", "err", err)
		}
	}
}

// sfuOffer offers to the SFU now, or once the outstanding offer is answered.
func (c *Call) sfuOffer(link *sfuLink) {
	c.mu.Lock()
	conn := c.attached
	c.mu.Unlock()
	if link.closed || conn == nil {
		return
	}
	if link.offering || link.pc.SignalingState() != webrtc.SignalingStateStable {
		link.again = true
		return
	}
	restart := link.restartPending
	offer, err := link.pc.CreateOffer(&webrtc.OfferOptions{ICERestart: restart})
	if err == nil {
		err = link.pc.SetLocalDescription(offer)
	}
	if err != nil {
		c.rt.cfg.logger.Warn("parley: offer to the SFU", "err", err)
		return
	}
	link.restartPending = false
	link.offering = true
	link.again = false
	payload := map[string]any{"kind": "offer", "sdp": offer.SDP}
	if restart {
		payload["ice_restart"] = true
	}
	if !link.offerAcked {
		payload["credential"] = link.credential
	}
	req := map[string]any{"type": "call.signal", "call_id": c.ID, "from": c.ParticipantID, "to": SFUPeerID, "signal": payload}
	if _, err := conn.send(req, func(f *frame) {
		c.inbox.push(callInput{fn: func() { c.sfuOfferReply(link, f) }})
	}); err != nil {
		// The connection is gone; the reconnect path offers again.
		c.sfuAbandonOffer(link)
	}
}

func (c *Call) sfuOfferReply(link *sfuLink, f *frame) {
	if link.closed {
		return
	}
	if f.Type != "error" {
		link.offerAcked = true
		return
	}
	err := f.asError()
	c.rt.cfg.logger.Warn("parley: the SFU refused the offer", "err", err)
	if err.Code == "forbidden" && strings.HasPrefix(err.Reason, "credential") {
		// Expired or for another session: join again for a fresh one, on a new connection.
		c.mu.Lock()
		c.sfuJoin = nil
		c.mu.Unlock()
		c.startSFU(link.session)
		return
	}
	c.sfuAbandonOffer(link)
}

// sfuAbandonOffer gives up the outstanding offer. pion has no rollback: a refused first offer
// leaves nothing to keep, so the connection is replaced; a refused re-offer is closed with the
// last answer, which keeps the session as negotiated.
func (c *Call) sfuAbandonOffer(link *sfuLink) {
	link.offering = false
	if link.pc.SignalingState() != webrtc.SignalingStateHaveLocalOffer {
		return
	}
	if last := link.pc.CurrentRemoteDescription(); last != nil {
		if err := link.pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: last.SDP}); err != nil {
			c.rt.cfg.logger.Warn("parley: SFU rollback", "err", err)
		}
	}
}

// onSFUSignal applies a signal from the SFU: its answer (it never offers).
func (c *Call) onSFUSignal(sig *signalPayload) {
	link := c.currentSFU()
	if link == nil || link.closed {
		return
	}
	switch sig.Kind {
	case "answer":
		if link.pc.SignalingState() != webrtc.SignalingStateHaveLocalOffer {
			return
		}
		if err := link.pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: sig.SDP}); err != nil {
			c.rt.cfg.logger.Warn("parley: the SFU's answer", "err", err)
		}
		// The answer may come before the offer's ack: either means the credential was taken,
		// and a re-offer must not carry it again (that would open a new SFU session).
		link.offerAcked = true
		link.offering = false
		if link.again || link.restartPending {
			c.sfuOffer(link)
		}
	case "candidate":
		if link.pc.RemoteDescription() != nil {
			_ = link.pc.AddICECandidate(webrtc.ICECandidateInit{Candidate: sig.Candidate})
		}
	}
}

func (c *Call) sfuCandidate(link *sfuLink, cand string) {
	c.mu.Lock()
	conn := c.attached
	c.mu.Unlock()
	if link.closed || conn == nil || link.pc.LocalDescription() == nil {
		return
	}
	payload := map[string]any{"kind": "end_of_candidates"}
	if cand != "" {
		payload = map[string]any{"kind": "candidate", "candidate": cand}
	}
	req := map[string]any{"type": "call.signal", "call_id": c.ID, "from": c.ParticipantID, "to": SFUPeerID, "signal": payload}
	_, _ = conn.send(req, func(*frame) {})
}

// closeP2P closes every P2P connection (the call moved to the SFU).
func (c *Call) closeP2P() {
	c.mu.Lock()
	peers := c.peerList()
	c.peers = map[string]*Peer{}
	c.mu.Unlock()
	for _, p := range peers {
		_ = p.pc.Close()
	}
}

func drainRTCP(s *webrtc.RTPSender) {
	buf := make([]byte, 1500)
	for {
		if _, _, err := s.Read(buf); err != nil {
			return
		}
	}
}
