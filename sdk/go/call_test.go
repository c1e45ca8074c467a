package parley_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	parley "github.com/parley-chat/parley/sdk/go"
)

// inbox collects the text messages a participant receives on its data channels.
type inbox struct {
	mu     sync.Mutex
	msgs   []string
	tracks []string                       // kind/codec of remote tracks
	open   map[string]*webrtc.DataChannel // by peer participant id: our own "chat" channel
}

func (b *inbox) has(text string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, m := range b.msgs {
		if m == text {
			return true
		}
	}
	return false
}

func (b *inbox) channel(peer string) *webrtc.DataChannel {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.open[peer]
}

// callOptions wire a participant's data channels into box.
func callOptions(box *inbox) []parley.CallOption {
	box.open = map[string]*webrtc.DataChannel{}
	onDC := func(p *parley.Peer, dc *webrtc.DataChannel) {
		dc.OnMessage(func(m webrtc.DataChannelMessage) {
			box.mu.Lock()
			box.msgs = append(box.msgs, string(m.Data))
			box.mu.Unlock()
		})
		dc.OnOpen(func() {
			box.mu.Lock()
			box.open[p.ParticipantID] = dc
			box.mu.Unlock()
		})
	}
	onTrack := func(_ *parley.Peer, tr *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
		box.mu.Lock()
		box.tracks = append(box.tracks, tr.Kind().String()+"/"+tr.Codec().MimeType)
		box.mu.Unlock()
		go func() {
			for {
				if _, _, err := tr.ReadRTP(); err != nil {
					return
				}
			}
		}()
	}
	return []parley.CallOption{parley.WithLoopbackOnly(), parley.WithDataChannel("chat"), parley.OnDataChannel(onDC), parley.OnTrack(onTrack)}
}

// exchange sends a text from each side to the other and waits until both arrived.
func exchange(t *testing.T, a, b *inbox, aCall, bCall *parley.Call, tag string) {
	t.Helper()
	waitFor(t, 20*time.Second, func() bool {
		return a.channel(bCall.ParticipantID) != nil && b.channel(aCall.ParticipantID) != nil
	}, func() string { return "an open data channel on both sides (" + tag + ")" })
	ta, tb := "from alice "+tag, "from bob "+tag
	deadline := time.Now().Add(20 * time.Second)
	for !(b.has(ta) && a.has(tb)) {
		if time.Now().After(deadline) {
			t.Fatalf("expected %q at bob and %q at alice within 20 s; bob got %v, alice got %v", ta, tb, b.msgs, a.msgs)
		}
		// Resent until it arrives: an ICE restart may be under way.
		_ = a.channel(bCall.ParticipantID).SendText(ta)
		_ = b.channel(aCall.ParticipantID).SendText(tb)
		time.Sleep(100 * time.Millisecond)
	}
}

// selectedPair is the ICE candidate pair a peer's data flows on.
func selectedPair(t *testing.T, p *parley.Peer) *webrtc.ICECandidatePair {
	t.Helper()
	sctp := p.PeerConnection().SCTP()
	if sctp == nil {
		t.Fatal("expected an SCTP transport")
	}
	pair, err := sctp.Transport().ICETransport().GetSelectedCandidatePair()
	if err != nil || pair == nil {
		t.Fatalf("expected a selected candidate pair, got %v %v", pair, err)
	}
	return pair
}

func remoteUfrag(p *parley.Peer) string {
	d := p.PeerConnection().RemoteDescription()
	if d == nil {
		return ""
	}
	for _, l := range strings.Split(d.SDP, "\n") {
		if strings.HasPrefix(l, "a=ice-ufrag:") {
			return strings.TrimSpace(strings.TrimPrefix(l, "a=ice-ufrag:"))
		}
	}
	return ""
}

// TestCallDataChannel: two Go peers join a call through Parley, negotiate (perfect
// negotiation, trickle ICE) on 127.0.0.1 only and exchange text over a data channel; a track
// added and then removed mid-call renegotiates (bob receives VP8); then alice's WebSocket is cut: she reconnects, attaches the call again, restarts ICE, and data
// flows again.
func TestCallDataChannel(t *testing.T) {
	srv := startServer(t, "--call-reconnect-grace-ms", "20000")
	px := startProxy(t, "127.0.0.1:"+srv.Port)
	ctx := ctxT(t)
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "call", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	fast := parley.WithBackoff(20*time.Millisecond, 200*time.Millisecond)
	aliceRT := connect(t, srv.client(t, "alice", px.URL), fast)
	bobRT := connect(t, srv.client(t, "bob"))
	discardEvents(aliceRT, bobRT)

	var aBox, bBox inbox
	aCall, err := aliceRT.StartCall(ctx, ch.ID, callOptions(&aBox)...)
	if err != nil {
		t.Fatalf("alice starts and joins the call: %v", err)
	}
	bCall, err := bobRT.StartCall(ctx, ch.ID, callOptions(&bBox)...)
	if err != nil {
		t.Fatalf("bob joins the call: %v", err)
	}
	if aCall.ID != bCall.ID {
		t.Fatalf("expected a second start to return the active call %s, got %s", aCall.ID, bCall.ID)
	}
	exchange(t, &aBox, &bBox, aCall, bCall, "1")

	aPeer, ok := aCall.Peer(bCall.ParticipantID)
	if !ok {
		t.Fatal("expected alice to have a peer for bob")
	}
	bPeer, _ := bCall.Peer(aCall.ParticipantID)
	if bPeer.Role != parley.Polite || aPeer.Role != parley.Impolite {
		t.Fatalf("expected bob (later) polite and alice impolite, got %s and %s", bPeer.Role, aPeer.Role)
	}
	for _, p := range []*parley.Peer{aPeer, bPeer} {
		pair := selectedPair(t, p)
		if pair.Local.Address != "127.0.0.1" || pair.Remote.Address != "127.0.0.1" {
			t.Fatalf("expected media on 127.0.0.1 only, selected pair %s", pair)
		}
	}

	// A track added mid-call renegotiates: bob receives it; removing it renegotiates again.
	video, err := webrtc.NewTrackLocalStaticRTP(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8, ClockRate: 90000}, "video", "alice")
	if err != nil {
		t.Fatal(err)
	}
	offers := aPeer.Stats().OffersSent
	if err := aCall.AddTrack(video); err != nil {
		t.Fatalf("add track: %v", err)
	}
	stopVideo := make(chan struct{})
	go func() {
		for seq := uint16(1); ; seq++ {
			select {
			case <-stopVideo:
				return
			case <-time.After(20 * time.Millisecond):
				_ = video.WriteRTP(&rtp.Packet{Header: rtp.Header{Version: 2, SequenceNumber: seq, Timestamp: uint32(seq) * 3000}, Payload: []byte{0x10, 0, 0, 0}})
			}
		}
	}()
	waitFor(t, 20*time.Second, func() bool {
		bBox.mu.Lock()
		defer bBox.mu.Unlock()
		return len(bBox.tracks) == 1
	}, func() string {
		return fmt.Sprintf("bob receiving alice's video after a renegotiation (tracks %v)", bBox.tracks)
	})
	if bBox.tracks[0] != "video/"+webrtc.MimeTypeVP8 || aPeer.Stats().OffersSent <= offers {
		t.Fatalf("expected a VP8 video track through a new offer, got %v (offers %d → %d)", bBox.tracks, offers, aPeer.Stats().OffersSent)
	}
	close(stopVideo)
	offers = aPeer.Stats().OffersSent
	if err := aCall.RemoveTrack(video); err != nil {
		t.Fatalf("remove track: %v", err)
	}
	waitFor(t, 20*time.Second, func() bool {
		return aPeer.Stats().OffersSent > offers && aPeer.PeerConnection().SignalingState() == webrtc.SignalingStateStable
	}, func() string { return "a renegotiation after removing the track" })
	exchange(t, &aBox, &bBox, aCall, bCall, "1b after renegotiations")
	ufragBefore := remoteUfrag(bPeer)

	// Cut alice's WebSocket: she reconnects, re-attaches and restarts ICE.
	restartsBefore := aPeer.Stats().ICERestarts
	px.reset()
	waitFor(t, 20*time.Second, func() bool {
		return aPeer.Stats().ICERestarts > restartsBefore && remoteUfrag(bPeer) != ufragBefore &&
			aPeer.PeerConnection().SignalingState() == webrtc.SignalingStateStable
	}, func() string {
		return fmt.Sprintf("an ICE restart offer from alice answered by bob (restarts %d, bob's view of alice's ufrag %q → %q, alice's signaling %s)",
			aPeer.Stats().ICERestarts, ufragBefore, remoteUfrag(bPeer), aPeer.PeerConnection().SignalingState())
	})
	exchange(t, &aBox, &bBox, aCall, bCall, "2 after the ICE restart")
	if pair := selectedPair(t, aPeer); pair.Remote.Address != "127.0.0.1" {
		t.Fatalf("expected media on 127.0.0.1 after the restart, selected pair %s", pair)
	}

	// An ICE restart asked for by the polite side (what an ICE failure triggers).
	ufragBefore = remoteUfrag(aPeer)
	bRestarts := bPeer.Stats().ICERestarts
	bCall.RestartICE()
	waitFor(t, 20*time.Second, func() bool {
		return bPeer.Stats().ICERestarts > bRestarts && remoteUfrag(aPeer) != ufragBefore &&
			bPeer.PeerConnection().SignalingState() == webrtc.SignalingStateStable
	}, func() string { return "an ICE restart from bob answered by alice" })
	exchange(t, &aBox, &bBox, aCall, bCall, "3 after bob's ICE restart")

	if err := bCall.Leave(ctx); err != nil {
		t.Fatalf("bob leaves: %v", err)
	}
	waitFor(t, wait, func() bool { _, ok := aCall.Peer(bCall.ParticipantID); return !ok }, func() string {
		return "alice's peer for bob closed after bob left"
	})
	if err := aCall.Leave(ctx); err != nil {
		t.Fatalf("alice leaves: %v", err)
	}
	info, err := srv.client(t, "alice").GetCall(ctx, aCall.ID)
	if err != nil || info.EndedAt == nil {
		t.Fatalf("expected the call ended after both left, got %+v %v", info, err)
	}
}

// TestCallGraceTimeout: alice's connection is gone longer than the reconnect grace period; the
// server makes her leave (reason timeout), bob's peer for her closes, and when alice is back
// her call is over (the re-attach is refused) rather than half-alive.
func TestCallGraceTimeout(t *testing.T) {
	srv := startServer(t, "--call-reconnect-grace-ms", "400")
	px := startProxy(t, "127.0.0.1:"+srv.Port)
	ctx := ctxT(t)
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "grace", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	aliceRT := connect(t, srv.client(t, "alice", px.URL), parley.WithBackoff(20*time.Millisecond, 100*time.Millisecond))
	bobRT := connect(t, srv.client(t, "bob"))
	go func() {
		for range aliceRT.Events() {
		}
	}()
	var aBox, bBox inbox
	aCall, err := aliceRT.StartCall(ctx, ch.ID, callOptions(&aBox)...)
	if err != nil {
		t.Fatalf("alice joins: %v", err)
	}
	bCall, err := bobRT.StartCall(ctx, ch.ID, callOptions(&bBox)...)
	if err != nil {
		t.Fatalf("bob joins: %v", err)
	}
	exchange(t, &aBox, &bBox, aCall, bCall, "before the drop")

	px.setOffline(true)
	px.reset()
	left := nextEvent(t, bobRT, "alice leaving by timeout", func(e *parley.CallParticipantLeft) bool {
		return e.ParticipantID == aCall.ParticipantID
	})
	if left.Reason != "timeout" {
		t.Fatalf("expected alice to leave with reason timeout, got %q", left.Reason)
	}
	waitFor(t, wait, func() bool { _, ok := bCall.Peer(aCall.ParticipantID); return !ok }, func() string {
		return "bob's peer for alice closed"
	})
	px.setOffline(false)
	select {
	case <-aCall.Done():
	case <-time.After(wait):
		t.Fatalf("expected alice's call to end after her re-attach was refused, within %v", wait)
	}
}

// TestCallMesh: three participants make a full mesh (each joiner offers to everyone already
// there; roles by join order) and every one exchanges data with both others.
func TestCallMesh(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	users := []string{"alice", "bob", "carol"}
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "mesh", Members: users[1:]})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	boxes := make([]*inbox, len(users))
	calls := make([]*parley.Call, len(users))
	for i, u := range users {
		rt := connect(t, srv.client(t, u))
		discardEvents(rt)
		boxes[i] = &inbox{}
		calls[i], err = rt.StartCall(ctx, ch.ID, callOptions(boxes[i])...)
		if err != nil {
			t.Fatalf("%s joins: %v", u, err)
		}
	}
	for i := range users {
		for j := range users {
			if i == j {
				continue
			}
			p, ok := calls[i].Peer(calls[j].ParticipantID)
			if !ok {
				waitFor(t, wait, func() bool { p, ok = calls[i].Peer(calls[j].ParticipantID); return ok }, func() string {
					return users[i] + " having a peer for " + users[j]
				})
			}
			want := parley.Polite
			if i < j {
				want = parley.Impolite
			}
			if p.Role != want {
				t.Fatalf("expected %s to be %s towards %s (join order), got %s", users[i], want, users[j], p.Role)
			}
		}
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		missing := ""
		for i := range users {
			for j := range users {
				if i == j {
					continue
				}
				text := fmt.Sprintf("%s to %s", users[i], users[j])
				if !boxes[j].has(text) {
					missing = text
					if dc := boxes[i].channel(calls[j].ParticipantID); dc != nil {
						_ = dc.SendText(text)
					}
				}
			}
		}
		if missing == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("expected every pair of the mesh to exchange data within 20 s; missing %q", missing)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
