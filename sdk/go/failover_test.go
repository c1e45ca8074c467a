package parley_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// deployment is a multi-node Parley for failover tests, on the test PostgreSQL and NATS. The
// topology is one switch, PARLEY_TEST_TOPOLOGY: "all" (default) makes every node a `--role all`
// process (today's single process) on the shared PostgreSQL and NATS; "split" starts one
// `--role core` process (PostgreSQL + NATS) and makes the nodes `--role edge` processes (NATS
// only), which forward to the core. Killing a node is the same in both.
type deployment struct {
	nodes  []*server
	secret string
}

func startDeployment(t *testing.T, n int, secret string) *deployment {
	t.Helper()
	dbURL, natsURL := os.Getenv("PARLEY_TEST_DATABASE_URL"), os.Getenv("PARLEY_TEST_NATS_URL")
	if dbURL == "" || natsURL == "" {
		t.Fatal("PARLEY_TEST_DATABASE_URL and PARLEY_TEST_NATS_URL are not set: run the tests with scripts/test.sh, or `eval \"$(scripts/services.sh start)\"` first")
	}
	jwt := []string{"--jwt-hs256-secret", secret}
	var nodeFlags []string
	switch topo := os.Getenv("PARLEY_TEST_TOPOLOGY"); topo {
	case "", "all":
		nodeFlags = append([]string{"--database-url", dbURL, "--nats-url", natsURL}, jwt...)
	case "split":
		startServer(t, append([]string{"--role", "core", "--database-url", dbURL, "--nats-url", natsURL}, jwt...)...)
		// Edges connect as the edge user, which the test server forbids to publish persisted
		// events (scripts/services.sh): the split runs with the production permissions.
		plain, user, pw := os.Getenv("PARLEY_TEST_NATS_PLAIN_URL"), os.Getenv("PARLEY_TEST_NATS_EDGE_USER"), os.Getenv("PARLEY_TEST_NATS_EDGE_PASSWORD")
		if plain == "" || user == "" || pw == "" {
			t.Fatal("PARLEY_TEST_NATS_PLAIN_URL and PARLEY_TEST_NATS_EDGE_USER/_PASSWORD are not set: start the services with scripts/services.sh")
		}
		nodeFlags = append([]string{"--role", "edge", "--nats-url", plain, "--nats-user", user, "--nats-password", pw}, jwt...)
	default:
		t.Fatalf("PARLEY_TEST_TOPOLOGY must be all or split, got %q", topo)
	}
	d := &deployment{secret: secret}
	for i := 0; i < n; i++ {
		d.nodes = append(d.nodes, startServer(t, nodeFlags...))
	}
	return d
}

// failoverMember is one subscribed client and what it delivered of its channel.
type failoverMember struct {
	user    string
	channel string
	rt      *parley.Realtime
	from    uint64
	before  string // the node it was on before the kill

	mu   sync.Mutex
	seqs []uint64
	ids  []string
	gaps int
}

func (m *failoverMember) last() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.seqs) == 0 {
		return m.from
	}
	return m.seqs[len(m.seqs)-1]
}

// TestFailoverKillNode: 1,000 clients, each given both nodes' addresses (WithURLs, listed order
// alternating, so exactly half are on each node), subscribed to 20 channels of 50; two senders
// produce messages throughout (one on each node, so one sender's outbox fails over too); node A
// is killed with SIGKILL. Every client of A reconnects to B, and every client's delivered seqs
// of its channel are contiguous from its subscription, without duplicates, and reach the last
// acknowledged message, which every client has (by message id).
func TestFailoverKillNode(t *testing.T) {
	const (
		clients  = 1000
		channels = 20
		secret   = "sdk-go-failover-test-secret-0123456789abcdef"
	)
	d := startDeployment(t, 2, secret)
	a, b := d.nodes[0], d.nodes[1]
	suffix := fmt.Sprint(time.Now().UnixNano())
	user := func(i int) string { return fmt.Sprintf("fo-%s-u%d", suffix, i) }
	senderNames := []string{"fo-" + suffix + "-sender-a", "fo-" + suffix + "-sender-b"}
	newClient := func(name string, first, second *server) *parley.Client {
		c, err := parley.New(first.URL, parley.WithURLs(second.URL), parley.WithURLOrder(parley.URLOrderListed), parley.WithToken(hs256(secret, name)))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	ctx := ctxT(t)

	senderA := connect(t, newClient(senderNames[0], a, b), parley.WithBackoff(200*time.Millisecond, 2*time.Second))
	senderB := connect(t, newClient(senderNames[1], b, a), parley.WithBackoff(200*time.Millisecond, 2*time.Second))
	discardEvents(senderA, senderB)
	owner := newClient(senderNames[0], a, b)
	chans := make([]string, channels)
	for c := range chans {
		members := []string{senderNames[1]}
		for i := c; i < clients; i += channels {
			members = append(members, user(i))
		}
		ch, err := owner.CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: fmt.Sprintf("failover-%d", c), Members: members})
		if err != nil {
			t.Fatalf("create channel %d: %v", c, err)
		}
		chans[c] = ch.ID
	}

	goroutinesBefore := runtime.NumGoroutine()
	members := make([]*failoverMember, clients)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range members {
		first, second := a, b
		if i%2 == 1 {
			first, second = b, a
		}
		m := &failoverMember{user: user(i), channel: chans[i%channels]}
		members[i] = m
		c := newClient(m.user, first, second)
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			rt, err := c.Connect(cctx)
			if err != nil {
				errs <- fmt.Errorf("%s connects: %w", m.user, err)
				return
			}
			m.rt = rt
			go func() {
				for ev := range rt.Events() {
					switch e := ev.(type) {
					case *parley.Gap:
						if e.ChannelID == m.channel {
							m.mu.Lock()
							m.gaps++
							m.mu.Unlock()
						}
					case parley.ChannelEvent:
						meta := e.Channel()
						if meta.ChannelID != m.channel {
							continue
						}
						m.mu.Lock()
						m.seqs = append(m.seqs, meta.Seq)
						if mn, ok := ev.(*parley.MessageNew); ok {
							m.ids = append(m.ids, mn.Message.ID)
						}
						m.mu.Unlock()
					}
				}
			}()
			from, err := rt.Subscribe(cctx, m.channel)
			if err != nil {
				errs <- fmt.Errorf("%s subscribes: %w", m.user, err)
				return
			}
			m.mu.Lock()
			m.from = from
			m.mu.Unlock()
			m.before = rt.URL()
		}()
		if i%100 == 99 {
			wg.Wait()
		}
	}
	wg.Wait()
	t.Cleanup(func() {
		var cw sync.WaitGroup
		for _, m := range members {
			if m.rt != nil {
				cw.Add(1)
				go func() { defer cw.Done(); _ = m.rt.Close() }()
			}
		}
		cw.Wait()
	})
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	var onA []*failoverMember
	for _, m := range members {
		if m.before == a.URL {
			onA = append(onA, m)
		}
	}
	if len(onA) != clients/2 {
		t.Fatalf("%d clients on node A, want %d", len(onA), clients/2)
	}
	t.Logf("%d clients connected and subscribed; %d goroutines for them (%.1f per client)", clients,
		runtime.NumGoroutine()-goroutinesBefore, float64(runtime.NumGoroutine()-goroutinesBefore)/clients)

	// Two senders, one message every 40 ms each, round robin over the channels.
	type ackedMsg struct {
		id  string
		seq uint64
	}
	var ackMu sync.Mutex
	acked := map[string][]ackedMsg{}
	var sending atomic.Bool
	sending.Store(true)
	var pending sync.WaitGroup
	var failures atomic.Int64
	var firstFailure atomic.Value
	produce := func(rt *parley.Realtime, tag string) {
		for n := 0; sending.Load(); n++ {
			ch := chans[n%channels]
			o := rt.Post(ch, fmt.Sprintf("%s-%d", tag, n))
			pending.Add(1)
			go func() {
				defer pending.Done()
				wctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				defer cancel()
				msg, err := o.Wait(wctx)
				if err != nil {
					failures.Add(1)
					firstFailure.CompareAndSwap(nil, err.Error())
					return
				}
				ackMu.Lock()
				acked[ch] = append(acked[ch], ackedMsg{msg.ID, msg.Seq})
				ackMu.Unlock()
			}()
			time.Sleep(40 * time.Millisecond)
		}
	}
	var producers sync.WaitGroup
	producers.Add(2)
	go func() { defer producers.Done(); produce(senderA, "a") }()
	go func() { defer producers.Done(); produce(senderB, "b") }()
	defer func() { sending.Store(false); producers.Wait() }()

	time.Sleep(3 * time.Second)
	countAcked := func() int {
		ackMu.Lock()
		defer ackMu.Unlock()
		n := 0
		for _, l := range acked {
			n += len(l)
		}
		return n
	}
	ackedBeforeKill := countAcked()
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()

	waitUntilT(t, 45*time.Second, "every client of the killed node is connected to the other one", func() (bool, string) {
		states := map[string]int{}
		done := true
		for _, m := range onA {
			s, u := m.rt.State(), m.rt.URL()
			if s != parley.StateConnected || u != b.URL {
				done = false
			}
			node := "A"
			if u == b.URL {
				node = "B"
			}
			states[fmt.Sprintf("%v@%s", s, node)]++
		}
		return done, fmt.Sprint(states)
	})
	failedOverIn := time.Since(killedAt)
	time.Sleep(2 * time.Second) // keep sending after everyone is back
	sending.Store(false)
	producers.Wait()
	pending.Wait()
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d sends failed for good, first: %v", n, firstFailure.Load())
	}

	lastAcked := map[string]uint64{}
	for ch, l := range acked {
		for _, x := range l {
			lastAcked[ch] = max(lastAcked[ch], x.seq)
		}
	}
	waitUntilT(t, 30*time.Second, "every client has delivered through its channel's last acked seq", func() (bool, string) {
		behind := 0
		example := ""
		for _, m := range members {
			if got := m.last(); got < lastAcked[m.channel] {
				behind++
				if example == "" {
					example = fmt.Sprintf("%s at %d of %d", m.user, got, lastAcked[m.channel])
				}
			}
		}
		return behind == 0, fmt.Sprintf("%d behind, e.g. %s", behind, example)
	})

	problems, gapsOnA, gaps := 0, 0, 0
	for _, m := range members {
		m.mu.Lock()
		ok := true
		for k, s := range m.seqs {
			if s != m.from+uint64(k)+1 {
				ok = false
			}
		}
		ids := map[string]bool{}
		for _, id := range m.ids {
			ids[id] = true
		}
		missing := 0
		for _, x := range acked[m.channel] {
			if !ids[x.id] {
				missing++
			}
		}
		if !ok || len(ids) != len(m.ids) || missing > 0 {
			problems++
			if problems <= 5 {
				t.Errorf("%s (was on %s): from %d, seqs %v; %d duplicate ids; %d acked messages missing", m.user, m.before, m.from, m.seqs, len(m.ids)-len(ids), missing)
			}
		}
		gaps += m.gaps
		if m.before == a.URL {
			gapsOnA += m.gaps
		}
		m.mu.Unlock()
	}
	if problems > 0 {
		t.Fatalf("%d of %d clients lost, repeated or reordered events", problems, clients)
	}
	total := countAcked()
	if ackedBeforeKill < 50 || total-ackedBeforeKill < 50 {
		t.Fatalf("too little traffic to mean anything: %d acked before the kill, %d after", ackedBeforeKill, total-ackedBeforeKill)
	}
	t.Logf("%d clients, %d on the killed node, all back on the other in %v; %d messages acked (%d before the kill); every client contiguous, no duplicates; gaps filled from storage: %d on the killed node's clients, %d in all",
		clients, len(onA), failedOverIn.Round(time.Millisecond), total, ackedBeforeKill, gapsOnA, gaps)
}

// waitUntilT polls cond every 20 ms until it holds, failing after timeout with what and cond's detail.
func waitUntilT(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s: %s", timeout, what, detail)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRESTRefusedAddressMovesOn: a client whose first address refuses connections (nothing
// listens there) sends even a non-idempotent request (create a channel) to the next address at
// once, and keeps using that address afterwards.
func TestRESTRefusedAddressMovesOn(t *testing.T) {
	s := startServer(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	_ = l.Close() // now refused
	c, err := parley.New(dead, parley.WithURLs(s.URL), parley.WithURLOrder(parley.URLOrderListed), parley.WithToken(s.token(t, "alice")))
	if err != nil {
		t.Fatal(err)
	}
	if c.BaseURL() != dead {
		t.Fatalf("listed order starts at %s, want %s", c.BaseURL(), dead)
	}
	ch, err := c.CreateChannel(ctxT(t), parley.CreateChannelParams{Kind: parley.KindChannel, Name: "refused-first"})
	if err != nil {
		t.Fatalf("create channel with a refused first address: %v", err)
	}
	if c.BaseURL() != s.URL {
		t.Fatalf("after the refusal REST is on %s, want %s", c.BaseURL(), s.URL)
	}
	// The realtime connection starts where REST is now, and works.
	rt := connect(t, c)
	if rt.URL() != s.URL {
		t.Fatalf("realtime on %s, want %s", rt.URL(), s.URL)
	}
	if _, err := rt.Subscribe(ctxT(t), ch.ID); err != nil {
		t.Fatal(err)
	}
}
