package parley_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	parley "github.com/parley-chat/parley/sdk/go"
)

// wait bounds every single wait of these tests.
const wait = 15 * time.Second

// parleyBin is the server binary under test: $PARLEY_BIN, or the default cargo target path.
func parleyBin(t testing.TB) string {
	t.Helper()
	if bin := os.Getenv("PARLEY_BIN"); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			t.Fatalf("PARLEY_BIN=%s: %v (build it with `cargo build -p parley --locked` at the repository root)", bin, err)
		}
		return bin
	}
	target := os.Getenv("CARGO_TARGET_DIR")
	if target == "" {
		// Where `cargo build` puts it: the repository's target/ (the tests run in sdk/go).
		target, _ = filepath.Abs(filepath.Join("..", "..", "target"))
	}
	bin := filepath.Join(target, "debug", "parley")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("the parley server binary is needed: PARLEY_BIN is unset and %s does not exist; "+
			"build it with `cd <repo> && cargo build -p parley --locked`, or set PARLEY_BIN to its path", bin)
	}
	return bin
}

// server is a `parley serve` process of its own, on 127.0.0.1 with a temporary data folder.
type server struct {
	URL  string
	Port string
	bin  string
	dir  string
	logs *lockedBuffer
	cmd  *exec.Cmd
}

var listening = regexp.MustCompile(`listening on (http://127\.0\.0\.1:(\d+))`)

// startServer runs `parley serve` with extra flags and stops it when the test ends.
func startServer(t testing.TB, flags ...string) *server {
	t.Helper()
	bin := parleyBin(t)
	dir := t.TempDir()
	args := append([]string{"serve", "--listen", "127.0.0.1:0", "--data-dir", dir}, flags...)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "PARLEY_LOG=warn")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", bin, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("server log (tail):\n%s", logs.tail(4000))
		}
	})
	line := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		l, _ := r.ReadString('\n')
		line <- l
		_, _ = io.Copy(io.Discard, r)
	}()
	select {
	case l := <-line:
		m := listening.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("expected `parley listening on http://127.0.0.1:PORT` as the first stdout line, got %q; log: %s", l, logs.tail(2000))
		}
		return &server{URL: m[1], Port: m[2], bin: bin, dir: dir, logs: logs, cmd: cmd}
	case <-time.After(30 * time.Second):
		t.Fatalf("the server did not print its address within 30 s; log: %s", logs.tail(2000))
	}
	return nil
}

// token signs an access token for user with the server's development key.
func (s *server) token(t testing.TB, user string) string {
	t.Helper()
	out, err := exec.Command(s.bin, "token", "--user", user, "--data-dir", s.dir).Output()
	if err != nil {
		t.Fatalf("parley token --user %s: %v", user, err)
	}
	return strings.TrimSpace(string(out))
}

// client is a REST client for user against baseURL (the server's, or a proxy's).
func (s *server) client(t testing.TB, user string, baseURL ...string) *parley.Client {
	t.Helper()
	u := s.URL
	if len(baseURL) > 0 {
		u = baseURL[0]
	}
	c, err := parley.New(u, parley.WithToken(s.token(t, user)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// connect opens a Realtime client and closes it when the test ends.
func connect(t testing.TB, c *parley.Client, opts ...parley.RealtimeOption) *parley.Realtime {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	rt, err := c.Connect(ctx, opts...)
	if err != nil {
		t.Fatalf("connecting a realtime client: %v", err)
	}
	t.Cleanup(func() { _ = rt.Close() })
	return rt
}

// nextEvent returns the next event matching pred within wait, skipping others.
func nextEvent[E parley.Event](t testing.TB, rt *parley.Realtime, what string, pred func(E) bool) E {
	t.Helper()
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	var skipped []string
	for {
		select {
		case ev, ok := <-rt.Events():
			if !ok {
				t.Fatalf("events closed while waiting for %s", what)
			}
			if e, ok := ev.(E); ok && (pred == nil || pred(e)) {
				return e
			}
			if len(skipped) < 20 {
				skipped = append(skipped, fmt.Sprintf("%s %+v", ev.Type(), ev))
			}
		case <-deadline.C:
			t.Fatalf("expected %s within %v; skipped meanwhile: %v", what, wait, skipped)
		}
	}
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return ctx
}

// lockedBuffer collects a process's stderr.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.buf.String()
	if len(s) > n {
		s = s[len(s)-n:]
	}
	return s
}

// ---- a TCP proxy whose connections the test can cut ----

// proxy forwards 127.0.0.1 connections to a target and can reset them all at once (a real
// socket fault: the client sees a connection reset) or refuse new ones (offline).
type proxy struct {
	t      testing.TB
	ln     net.Listener
	target string
	URL    string

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	offline bool
	resets  int
}

func startProxy(t testing.TB, target string) *proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{t: t, ln: ln, target: target, URL: "http://" + ln.Addr().String(), conns: map[net.Conn]struct{}{}}
	go p.accept()
	t.Cleanup(func() {
		_ = ln.Close()
		p.reset()
	})
	return p
}

func (p *proxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		offline := p.offline
		p.mu.Unlock()
		if offline {
			rst(c)
			continue
		}
		up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			rst(c)
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		go p.pipe(c, up)
		go p.pipe(up, c)
	}
}

func (p *proxy) pipe(dst, src net.Conn) {
	_, _ = io.Copy(dst, src)
	rst(dst)
	rst(src)
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// reset cuts every open connection with a TCP reset.
func (p *proxy) reset() {
	p.mu.Lock()
	conns := p.conns
	p.conns = map[net.Conn]struct{}{}
	p.resets++
	p.mu.Unlock()
	for c := range conns {
		rst(c)
	}
}

// setOffline refuses (resets) new connections while on.
func (p *proxy) setOffline(off bool) {
	p.mu.Lock()
	p.offline = off
	p.mu.Unlock()
}

func rst(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// discardEvents reads and drops the events of clients whose events a test does not check, so
// their delivery never blocks.
func discardEvents(rts ...*parley.Realtime) {
	for _, rt := range rts {
		go func() {
			for range rt.Events() {
			}
		}()
	}
}

// countReconnects returns a counter of the Reconnecting transitions of every client given the
// returned option.
func countReconnects() (*atomic.Int32, parley.RealtimeOption) {
	var n atomic.Int32
	return &n, parley.WithStateHandler(func(c parley.StateChange) {
		if c.To == parley.StateReconnecting {
			n.Add(1)
		}
	})
}
