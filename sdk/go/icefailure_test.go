package parley_test

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/stdnet"
	"github.com/pion/webrtc/v4"

	parley "github.com/parley-chat/parley/sdk/go"
)

// ---- a network for pion that the test can cut ----

// cuttableNet is the machine's network (stdnet) for pion's ICE agents, with a switch: while
// cut is on, every UDP packet the agents send is dropped and every packet they receive is
// discarded, as if the path between the peers had gone. The WebSockets do not use it, so
// signaling keeps working. Packets for any address other than 127.0.0.1 are never sent (and
// counted in offLoopback): the test fails if there is one.
type cuttableNet struct {
	*stdnet.Net
	cut         *atomic.Bool
	offLoopback *atomic.Int64
}

var _ transport.Net = (*cuttableNet)(nil)

func newCuttableNet(t *testing.T, cut *atomic.Bool, offLoopback *atomic.Int64) *cuttableNet {
	t.Helper()
	n, err := stdnet.NewNet()
	if err != nil {
		t.Fatalf("stdnet: %v", err)
	}
	return &cuttableNet{Net: n, cut: cut, offLoopback: offLoopback}
}

func (n *cuttableNet) ListenUDP(network string, laddr *net.UDPAddr) (transport.UDPConn, error) {
	c, err := n.Net.ListenUDP(network, laddr)
	if err != nil {
		return nil, err
	}
	return &cuttableConn{UDPConn: c, net: n}, nil
}

func (n *cuttableNet) ListenPacket(network, address string) (net.PacketConn, error) {
	c, err := n.Net.ListenPacket(network, address)
	if err != nil {
		return nil, err
	}
	if uc, ok := c.(*net.UDPConn); ok {
		return &cuttableConn{UDPConn: uc, net: n}, nil
	}
	return nil, fmt.Errorf("cuttableNet: %s sockets are not wrapped", network)
}

// allowed says whether a packet to addr may be sent now.
func (n *cuttableNet) allowed(addr net.Addr) bool {
	if ua, ok := addr.(*net.UDPAddr); ok && !ua.IP.Equal(net.IPv4(127, 0, 0, 1)) {
		n.offLoopback.Add(1)
		return false
	}
	return !n.cut.Load()
}

// cuttableConn is a UDP socket of cuttableNet. Only the methods of transport.UDPConn are
// promoted (an interface is embedded), and every read and write one of them is wrapped, so
// pion cannot go around the switch (it also only takes its fast paths on a bare *net.UDPConn).
type cuttableConn struct {
	transport.UDPConn
	net *cuttableNet
}

func (c *cuttableConn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		n, addr, err := c.UDPConn.ReadFrom(p)
		if err != nil || !c.net.cut.Load() {
			return n, addr, err
		}
	}
}

func (c *cuttableConn) ReadFromUDP(p []byte) (int, *net.UDPAddr, error) {
	for {
		n, addr, err := c.UDPConn.ReadFromUDP(p)
		if err != nil || !c.net.cut.Load() {
			return n, addr, err
		}
	}
}

func (c *cuttableConn) Read(p []byte) (int, error) {
	for {
		n, err := c.UDPConn.Read(p)
		if err != nil || !c.net.cut.Load() {
			return n, err
		}
	}
}

func (c *cuttableConn) ReadMsgUDP(p, oob []byte) (int, int, int, *net.UDPAddr, error) {
	for {
		n, oobn, flags, addr, err := c.UDPConn.ReadMsgUDP(p, oob)
		if err != nil || !c.net.cut.Load() {
			return n, oobn, flags, addr, err
		}
	}
}

func (c *cuttableConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	if !c.net.allowed(addr) {
		return len(p), nil // lost on the way
	}
	return c.UDPConn.WriteTo(p, addr)
}

func (c *cuttableConn) WriteToUDP(p []byte, addr *net.UDPAddr) (int, error) {
	if !c.net.allowed(addr) {
		return len(p), nil
	}
	return c.UDPConn.WriteToUDP(p, addr)
}

func (c *cuttableConn) Write(p []byte) (int, error) {
	if !c.net.allowed(c.UDPConn.RemoteAddr()) {
		return len(p), nil
	}
	return c.UDPConn.Write(p)
}

func (c *cuttableConn) WriteMsgUDP(p, oob []byte, addr *net.UDPAddr) (int, int, error) {
	to := net.Addr(addr)
	if addr == nil {
		to = c.UDPConn.RemoteAddr()
	}
	if !c.net.allowed(to) {
		return len(p), len(oob), nil
	}
	return c.UDPConn.WriteMsgUDP(p, oob, addr)
}

// iceWatch records the ICE transport states one peer goes through.
type iceWatch struct {
	mu     sync.Mutex
	states []webrtc.ICETransportState
}

func (w *iceWatch) record(s webrtc.ICETransportState) {
	w.mu.Lock()
	w.states = append(w.states, s)
	w.mu.Unlock()
}

// failedThenConnected reports whether the transport failed and then connected again.
func (w *iceWatch) failedThenConnected() (failed, reconnected bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, s := range w.states {
		switch {
		case s == webrtc.ICETransportStateFailed:
			failed, reconnected = true, false
		case failed && (s == webrtc.ICETransportStateConnected || s == webrtc.ICETransportStateCompleted):
			reconnected = true
		}
	}
	return failed, reconnected
}

func (w *iceWatch) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return fmt.Sprint(w.states)
}

// iceTimeouts are the ICE timeouts of one participant.
type iceTimeouts struct{ disconnected, failed time.Duration }

// TestCallICEFailureRestartsICE: two Go peers in a call with a data channel (127.0.0.1 only,
// short ICE timeouts; keepalives every 0.2 s); then the network between them fails — their UDP
// packets are dropped while the WebSockets stay up — until ICE fails. When the network comes
// back, the SDK has restarted ICE on its own (no RestartICE call, no reconnect of the realtime
// clients): new ICE credentials on both sides, ICE connected again, and data sent after the
// recovery arrives. Three variants: the first failure (on the impolite side, the controlling
// agent) ends the outage; the polite side has the shorter timeouts and fails alone; the outage
// lasts until both sides have failed (restarts that fail again, and restart offers that may
// cross).
func TestCallICEFailureRestartsICE(t *testing.T) {
	short := iceTimeouts{500 * time.Millisecond, 1500 * time.Millisecond}
	long := iceTimeouts{1500 * time.Millisecond, 4 * time.Second}
	t.Run("first failure", func(t *testing.T) { testICEFailure(t, short, short, false) })
	t.Run("polite side fails", func(t *testing.T) { testICEFailure(t, long, short, false) })
	t.Run("both sides fail", func(t *testing.T) { testICEFailure(t, short, short, true) })
}

// testICEFailure runs one outage between alice (who joins first: impolite) and bob (polite).
// The network comes back after the first ICE failure, or, with untilBoth, once both sides' ICE
// has failed.
func testICEFailure(t *testing.T, aliceTimeouts, bobTimeouts iceTimeouts, untilBoth bool) {
	srv := startServer(t)
	ctx := ctxT(t)
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "icefail", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	reconnects, onState := countReconnects()
	aliceRT := connect(t, srv.client(t, "alice"), onState)
	bobRT := connect(t, srv.client(t, "bob"), onState)
	discardEvents(aliceRT, bobRT)

	var cut atomic.Bool
	var offLoopback atomic.Int64
	options := func(box *inbox, to iceTimeouts) []parley.CallOption {
		se := webrtc.SettingEngine{}
		se.SetICETimeouts(to.disconnected, to.failed, 200*time.Millisecond)
		se.SetNet(newCuttableNet(t, &cut, &offLoopback))
		// callOptions includes WithLoopbackOnly, applied on top of this SettingEngine.
		return append(callOptions(box), parley.WithSettingEngine(se))
	}
	var aBox, bBox inbox
	aCall, err := aliceRT.StartCall(ctx, ch.ID, options(&aBox, aliceTimeouts)...)
	if err != nil {
		t.Fatalf("alice starts and joins the call: %v", err)
	}
	t.Cleanup(func() { _ = aCall.Leave(context.Background()) })
	bCall, err := bobRT.StartCall(ctx, ch.ID, options(&bBox, bobTimeouts)...)
	if err != nil {
		t.Fatalf("bob joins the call: %v", err)
	}
	t.Cleanup(func() { _ = bCall.Leave(context.Background()) })
	exchange(t, &aBox, &bBox, aCall, bCall, "before the network failure")

	aPeer, ok := aCall.Peer(bCall.ParticipantID)
	if !ok {
		t.Fatal("expected alice to have a peer for bob")
	}
	bPeer, ok := bCall.Peer(aCall.ParticipantID)
	if !ok {
		t.Fatal("expected bob to have a peer for alice")
	}
	if aPeer.Role != parley.Impolite || bPeer.Role != parley.Polite {
		t.Fatalf("expected alice impolite and bob polite, got %s and %s", aPeer.Role, bPeer.Role)
	}
	peers := map[string]*parley.Peer{"alice": aPeer, "bob": bPeer}
	watches := map[string]*iceWatch{}
	for name, p := range peers {
		pair := selectedPair(t, p)
		if pair.Local.Address != "127.0.0.1" || pair.Remote.Address != "127.0.0.1" {
			t.Fatalf("expected %s's media on 127.0.0.1 only, selected pair %s", name, pair)
		}
		// ICETransport's own handler: the SDK's ICE handler on the PeerConnection stays in place.
		w := &iceWatch{}
		p.PeerConnection().SCTP().Transport().ICETransport().OnConnectionStateChange(w.record)
		watches[name] = w
	}
	restartsBefore := map[string]int{"alice": aPeer.Stats().ICERestarts, "bob": bPeer.Stats().ICERestarts}
	ufragsBefore := map[string]string{"alice": remoteUfrag(aPeer), "bob": remoteUfrag(bPeer)}
	reconnectsBefore := reconnects.Load()

	// The network between the peers fails, and stays down until ICE has failed.
	cutAt := time.Now()
	cut.Store(true)
	failures := func() int {
		n := 0
		for _, w := range watches {
			if failed, _ := w.failedThenConnected(); failed {
				n++
			}
		}
		return n
	}
	want := 1
	if untilBoth {
		want = 2
	}
	waitFor(t, 30*time.Second, func() bool { return failures() >= want }, func() string {
		return fmt.Sprintf("ICE failed on %d side(s) after the network was cut (alice %s, bob %s)", want, watches["alice"], watches["bob"])
	})
	cut.Store(false)
	t.Logf("network back %v after the cut; alice %s, bob %s", time.Since(cutAt).Round(time.Millisecond), watches["alice"], watches["bob"])

	// Back: ICE restarted by the SDK itself, new credentials, connected again.
	waitFor(t, 20*time.Second, func() bool {
		for name, p := range peers {
			if failed, back := watches[name].failedThenConnected(); failed && !back {
				return false
			}
			if remoteUfrag(p) == ufragsBefore[name] || p.PeerConnection().SignalingState() != webrtc.SignalingStateStable {
				return false
			}
			if s := p.PeerConnection().ICEConnectionState(); s != webrtc.ICEConnectionStateConnected && s != webrtc.ICEConnectionStateCompleted {
				return false
			}
		}
		return true
	}, func() string {
		return fmt.Sprintf("ICE restarted and connected again on both sides: alice (ICE %s, signaling %s, states %s, restarts %d → %d, bob's ufrag %q → %q), bob (ICE %s, signaling %s, states %s, restarts %d → %d, alice's ufrag %q → %q)",
			aPeer.PeerConnection().ICEConnectionState(), aPeer.PeerConnection().SignalingState(), watches["alice"], restartsBefore["alice"], aPeer.Stats().ICERestarts, ufragsBefore["alice"], remoteUfrag(aPeer),
			bPeer.PeerConnection().ICEConnectionState(), bPeer.PeerConnection().SignalingState(), watches["bob"], restartsBefore["bob"], bPeer.Stats().ICERestarts, ufragsBefore["bob"], remoteUfrag(bPeer))
	})
	t.Logf("connected again %v after the cut; alice %s (restarts %d → %d), bob %s (restarts %d → %d)",
		time.Since(cutAt).Round(time.Millisecond), watches["alice"], restartsBefore["alice"], aPeer.Stats().ICERestarts,
		watches["bob"], restartsBefore["bob"], bPeer.Stats().ICERestarts)
	for name, p := range peers {
		// Every side whose ICE failed made a restarting offer of its own (the other side may have
		// restarted only by answering, or its offer may have lost a glare).
		if failed, _ := watches[name].failedThenConnected(); failed && p.Stats().ICERestarts <= restartsBefore[name] {
			t.Fatalf("expected %s, whose ICE failed, to have restarted ICE on its own; restarts %d → %d", name, restartsBefore[name], p.Stats().ICERestarts)
		}
	}
	if n := reconnects.Load() - reconnectsBefore; n != 0 {
		t.Fatalf("expected the WebSockets to stay up (the restart must come from the ICE failure), got %d reconnects", n)
	}

	exchange(t, &aBox, &bBox, aCall, bCall, "after the ICE restart")
	for name, p := range peers {
		if pair := selectedPair(t, p); pair.Local.Address != "127.0.0.1" || pair.Remote.Address != "127.0.0.1" {
			t.Fatalf("expected %s's media on 127.0.0.1 after the restart, selected pair %s", name, pair)
		}
	}
	if n := offLoopback.Load(); n != 0 {
		t.Fatalf("expected every packet to go to 127.0.0.1; %d were addressed elsewhere (and dropped)", n)
	}
}

// TestCallRestartGlare: both sides of a pair restart ICE at the same moment, so that their
// restart offers cross (glare): the impolite side's offer wins and the polite side withdraws its
// own and answers — which pion cannot do with a rollback, see Call.rollbackLocal. Rounds are
// repeated until one of them was a glare (the polite side answered and the impolite side did
// not); every round must end stable, connected, with new ICE credentials, and data flowing.
func TestCallRestartGlare(t *testing.T) {
	srv := startServer(t)
	ctx := ctxT(t)
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "glare", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	aliceRT := connect(t, srv.client(t, "alice"))
	bobRT := connect(t, srv.client(t, "bob"))
	discardEvents(aliceRT, bobRT)
	var aBox, bBox inbox
	aCall, err := aliceRT.StartCall(ctx, ch.ID, callOptions(&aBox)...)
	if err != nil {
		t.Fatalf("alice starts and joins the call: %v", err)
	}
	t.Cleanup(func() { _ = aCall.Leave(context.Background()) })
	bCall, err := bobRT.StartCall(ctx, ch.ID, callOptions(&bBox)...)
	if err != nil {
		t.Fatalf("bob joins the call: %v", err)
	}
	t.Cleanup(func() { _ = bCall.Leave(context.Background()) })
	exchange(t, &aBox, &bBox, aCall, bCall, "before the restarts")
	aPeer, _ := aCall.Peer(bCall.ParticipantID)
	bPeer, _ := bCall.Peer(aCall.ParticipantID)
	if aPeer == nil || bPeer == nil || aPeer.Role != parley.Impolite || bPeer.Role != parley.Polite {
		t.Fatalf("expected alice impolite and bob polite, got %v and %v", aPeer, bPeer)
	}

	const rounds = 10
	glares := 0
	for round := 1; round <= rounds && glares == 0; round++ {
		a0, b0 := aPeer.Stats(), bPeer.Stats()
		ua, ub := remoteUfrag(aPeer), remoteUfrag(bPeer)
		var wg sync.WaitGroup
		for _, c := range []*parley.Call{aCall, bCall} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.RestartICE()
			}()
		}
		wg.Wait()
		var a, b parley.PeerStats
		waitFor(t, 20*time.Second, func() bool {
			a, b = aPeer.Stats(), bPeer.Stats()
			for _, p := range []*parley.Peer{aPeer, bPeer} {
				if p.PeerConnection().SignalingState() != webrtc.SignalingStateStable {
					return false
				}
				if s := p.PeerConnection().ICEConnectionState(); s != webrtc.ICEConnectionStateConnected && s != webrtc.ICEConnectionStateCompleted {
					return false
				}
			}
			return a.ICERestarts > a0.ICERestarts && b.ICERestarts > b0.ICERestarts &&
				remoteUfrag(aPeer) != ua && remoteUfrag(bPeer) != ub
		}, func() string {
			return fmt.Sprintf("round %d: both restarts done, stable and connected (alice %+v → %+v, %s, ICE %s; bob %+v → %+v, %s, ICE %s)", round,
				a0, aPeer.Stats(), aPeer.PeerConnection().SignalingState(), aPeer.PeerConnection().ICEConnectionState(),
				b0, bPeer.Stats(), bPeer.PeerConnection().SignalingState(), bPeer.PeerConnection().ICEConnectionState())
		})
		glare := a.AnswersSent == a0.AnswersSent && b.AnswersSent == b0.AnswersSent+1
		if glare {
			glares++
		}
		t.Logf("round %d: glare %v (alice %+v → %+v, bob %+v → %+v)", round, glare, a0, a, b0, b)
		exchange(t, &aBox, &bBox, aCall, bCall, fmt.Sprintf("after round %d", round))
	}
	if glares == 0 {
		t.Fatalf("expected the two restart offers to cross at least once in %d rounds", rounds)
	}
}
