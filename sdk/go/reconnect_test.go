package parley_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestLosslessReconnect: 1,000 sends while a TCP proxy between both clients and the server is
// reset at random moments; the receiver gets all 1,000 exactly once and in order. Then sends
// made while offline wait in the outbox and appear once when the network is back.
func TestLosslessReconnect(t *testing.T) {
	const total = 1000
	srv := startServer(t, "--ws-frames-per-second", "5000", "--ws-frame-burst", "5000")
	px := startProxy(t, "127.0.0.1:"+srv.Port)
	ctx := ctxT(t)

	alice := srv.client(t, "alice", px.URL)
	bob := srv.client(t, "bob", px.URL)
	direct := srv.client(t, "bob")
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "lossless", Members: []string{"bob"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}

	reconnects, onState := countReconnects()
	fast := parley.WithBackoff(20*time.Millisecond, 300*time.Millisecond)
	bobRT := connect(t, bob, fast, onState, parley.WithRequestTimeout(5*time.Second))
	aliceRT := connect(t, alice, fast, onState, parley.WithRequestTimeout(5*time.Second))
	if _, err := bobRT.Subscribe(ctx, ch.ID); err != nil {
		t.Fatalf("bob subscribes: %v", err)
	}

	// The receiver collects every message event.
	type got struct {
		seq  uint64
		text string
	}
	var (
		mu       sync.Mutex
		received []got
		gaps     int
	)
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for ev := range bobRT.Events() {
			switch e := ev.(type) {
			case *parley.MessageNew:
				mu.Lock()
				received = append(received, got{e.Seq, e.Message.Text})
				mu.Unlock()
			case *parley.Gap:
				mu.Lock()
				gaps++
				mu.Unlock()
			}
		}
	}()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(received)
	}

	// Faults: reset every connection through the proxy at random moments until the sends end.
	stopFaults := make(chan struct{})
	faultsDone := make(chan struct{})
	go func() {
		defer close(faultsDone)
		for {
			select {
			case <-stopFaults:
				return
			case <-time.After(time.Duration(50+rand.IntN(250)) * time.Millisecond):
				px.reset()
			}
		}
	}()

	outs := make([]*parley.Outgoing, total)
	for i := range total {
		outs[i] = aliceRT.Post(ch.ID, fmt.Sprintf("m%04d", i))
		if i%100 == 99 {
			time.Sleep(time.Duration(rand.IntN(50)) * time.Millisecond)
		}
	}
	sendCtx, cancel := context.WithTimeout(ctx, 150*time.Second)
	defer cancel()
	for i, o := range outs {
		if _, err := o.Wait(sendCtx); err != nil {
			t.Fatalf("send %d (of %d) not acknowledged: %v; %d still pending", i, total, err, len(aliceRT.Pending()))
		}
	}
	close(stopFaults)
	<-faultsDone
	retried := 0
	for _, o := range outs {
		if !o.Created() {
			retried++ // its first ack was lost with a connection; the resend found it committed
		}
	}
	t.Logf("%d sends acknowledged through %d connection resets (%d reconnects); %d acks lost and resent once",
		total, px.resets, reconnects.Load(), retried)
	if px.resets < 3 {
		t.Fatalf("expected the test to cut the connections several times, only %d", px.resets)
	}

	waitFor(t, 60*time.Second, func() bool { return count() >= total }, func() string {
		return fmt.Sprintf("all %d messages at the receiver, got %d", total, count())
	})
	checkOnceInOrder := func(n int) {
		t.Helper()
		mu.Lock()
		defer mu.Unlock()
		if len(received) != n {
			t.Fatalf("expected exactly %d messages at the receiver, got %d", n, len(received))
		}
		seen := map[string]bool{}
		for i, g := range received {
			if seen[g.text] {
				t.Fatalf("message %q delivered twice", g.text)
			}
			seen[g.text] = true
			if i > 0 && g.seq <= received[i-1].seq {
				t.Fatalf("out of order: seq %d after %d", g.seq, received[i-1].seq)
			}
		}
	}
	checkOnceInOrder(total)
	mu.Lock()
	for i, g := range received {
		if g.text != fmt.Sprintf("m%04d", i) {
			mu.Unlock()
			t.Fatalf("expected m%04d at position %d (send order), got %q", i, i, g.text)
		}
	}
	t.Logf("receiver: %d messages once and in order; %d gaps filled from storage", len(received), gaps)
	mu.Unlock()

	// History holds each message once.
	n := 0
	for _, err := range direct.HistoryAfter(ctx, ch.ID, 0, 200) {
		if err != nil {
			t.Fatalf("history: %v", err)
		}
		n++
	}
	if n != total {
		t.Fatalf("expected %d messages in history, got %d", total, n)
	}

	// Offline: the network is gone; sends wait in the outbox.
	px.setOffline(true)
	px.reset()
	waitFor(t, wait, func() bool { return aliceRT.State() == parley.StateReconnecting }, func() string {
		return "alice reconnecting while offline, state " + aliceRT.State().String()
	})
	const offline = 20
	var offOuts []*parley.Outgoing
	for i := range offline {
		offOuts = append(offOuts, aliceRT.Post(ch.ID, fmt.Sprintf("offline %02d", i)))
	}
	time.Sleep(300 * time.Millisecond)
	if p := len(aliceRT.Pending()); p != offline {
		t.Fatalf("expected %d sends pending in the outbox while offline, got %d", offline, p)
	}
	px.setOffline(false)
	for i, o := range offOuts {
		if _, err := o.Wait(sendCtx); err != nil {
			t.Fatalf("offline send %d not acknowledged after the network came back: %v", i, err)
		}
	}
	waitFor(t, wait, func() bool { return count() >= total+offline }, func() string {
		return fmt.Sprintf("the %d offline messages at the receiver, got %d in all", offline, count())
	})
	time.Sleep(200 * time.Millisecond) // anything extra (a duplicate) would arrive now
	checkOnceInOrder(total + offline)
	_ = aliceRT.Close()
	_ = bobRT.Close()
	<-recvDone
}

// waitFor polls cond every 10 ms for at most d.
func waitFor(t testing.TB, d time.Duration, cond func() bool, what func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("expected %s within %v", what(), d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
