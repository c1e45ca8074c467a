package parley_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// TestDrainReconnectFrame: two nodes on the test PostgreSQL and NATS behind one address (a
// proxy standing in for a load balancer). Node A gets SIGTERM and sends a `reconnect` frame; the
// client leaves A after the hinted delay (before A's 1001 at the end of its drain window),
// reconnects at once (the load balancer now sends it to B), resumes, and gets every message
// sent meanwhile once and in order.
func TestDrainReconnectFrame(t *testing.T) {
	dbURL, natsURL := os.Getenv("PARLEY_TEST_DATABASE_URL"), os.Getenv("PARLEY_TEST_NATS_URL")
	if dbURL == "" || natsURL == "" {
		t.Fatal("PARLEY_TEST_DATABASE_URL and PARLEY_TEST_NATS_URL are not set: run the tests with scripts/test.sh, or `eval \"$(scripts/services.sh start)\"` first")
	}
	const secret = "sdk-go-drain-test-secret-0123456789abcdef"
	const window = 4 * time.Second
	flags := []string{"--database-url", dbURL, "--nats-url", natsURL, "--jwt-hs256-secret", secret}
	a := startServer(t, append(flags, "--drain-window-ms", fmt.Sprint(window.Milliseconds()))...)
	b := startServer(t, flags...)
	lb := startSwitch(t, "127.0.0.1:"+a.Port)
	ctx := ctxT(t)
	suffix := fmt.Sprint(time.Now().UnixNano())
	aliceID, bobID := "alice-"+suffix, "bob-"+suffix
	alice, err := parley.New(b.URL, parley.WithToken(hs256(secret, aliceID)))
	if err != nil {
		t.Fatal(err)
	}
	bob, err := parley.New(lb.url, parley.WithToken(hs256(secret, bobID)))
	if err != nil {
		t.Fatal(err)
	}
	ch, err := alice.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "drain", Members: []string{bobID}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}

	var mu sync.Mutex
	var changes []parley.StateChange
	var reconnected atomic.Bool
	bobRT := connect(t, bob, parley.WithBackoff(2*time.Second, 5*time.Second), parley.WithStateHandler(func(c parley.StateChange) {
		mu.Lock()
		changes = append(changes, c)
		mu.Unlock()
		if c.From == parley.StateReconnecting && c.To == parley.StateConnected {
			reconnected.Store(true)
		}
	}))
	if _, err := bobRT.Subscribe(ctx, ch.ID); err != nil {
		t.Fatalf("bob subscribes: %v", err)
	}
	send := func(i int) {
		if _, err := alice.SendMessage(ctx, ch.ID, parley.SendParams{ClientMsgID: fmt.Sprintf("d%03d", i), Text: fmt.Sprintf("m%03d", i)}); err != nil {
			t.Errorf("send %d: %v", i, err)
		}
	}
	const before = 5
	for i := 0; i < before; i++ {
		send(i)
	}
	var seqs []uint64
	var texts []string
	collect := func(n int) {
		for len(texts) < n {
			ev := nextEvent[*parley.MessageNew](t, bobRT, fmt.Sprintf("message %d", len(texts)), nil)
			seqs = append(seqs, ev.Seq)
			texts = append(texts, ev.Message.Text)
		}
	}
	collect(before)

	// The load balancer sees A go unready and sends new connections to B; A drains.
	lb.target.Store("127.0.0.1:" + b.Port)
	drainStart := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Messages keep coming while A drains, until 10 after bob is back (on B).
	total := before
	after := 0
	for after < 10 && total < 400 {
		send(total)
		total++
		if reconnected.Load() {
			after++
		}
		time.Sleep(20 * time.Millisecond)
	}
	collect(total)

	for i, text := range texts {
		if text != fmt.Sprintf("m%03d", i) {
			t.Fatalf("message %d is %q: lost, repeated or out of order (%v)", i, text, texts)
		}
		if i > 0 && seqs[i] <= seqs[i-1] {
			t.Fatalf("seqs not increasing: %v", seqs)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var left, back time.Time
	for _, c := range changes {
		if c.To == parley.StateReconnecting && left.IsZero() {
			if c.Err == nil || !strings.Contains(c.Err.Error(), "draining") {
				t.Fatalf("the client left for another reason than the reconnect frame: %v", c.Err)
			}
			left = time.Now()
		}
		if c.To == parley.StateConnected && !left.IsZero() {
			back = time.Now()
		}
	}
	if left.IsZero() || back.IsZero() {
		t.Fatalf("no reconnect observed: %+v", changes)
	}
	// Left on the hint, at once (the backoff here is 2 s and more), before A's 1001.
	if since := time.Since(drainStart); since > window+3*time.Second {
		t.Fatalf("took %v", since)
	}
}

// hs256 signs an access token for user in the default tenant.
func hs256(secret, user string) string {
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "HS256", "typ": "JWT"})
	claims, _ := json.Marshal(map[string]any{"sub": user, "tid": "default", "iss": "parley", "aud": "parley", "exp": time.Now().Add(time.Hour).Unix()})
	signing := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(signing))
	return signing + "." + enc.EncodeToString(mac.Sum(nil))
}

// lbSwitch is a TCP proxy that sends each new connection to the current target, as a load
// balancer does after a node's readiness changes.
type lbSwitch struct {
	url    string
	target atomic.Value
}

func startSwitch(t testing.TB, target string) *lbSwitch {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &lbSwitch{url: "http://" + ln.Addr().String()}
	s.target.Store(target)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); _ = ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				var d net.Dialer
				up, err := d.DialContext(ctx, "tcp", s.target.Load().(string))
				if err != nil {
					_ = c.Close()
					return
				}
				go func() { _, _ = io.Copy(up, c); _ = up.Close() }()
				_, _ = io.Copy(c, up)
				_ = c.Close()
			}()
		}
	}()
	return s
}
