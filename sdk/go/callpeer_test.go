package parley_test

import (
	"bufio"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pion/rtp"
	"github.com/pion/webrtc/v4"

	parley "github.com/parley-chat/parley/sdk/go"
)

// callpeerLines runs examples/callpeer and collects its JSON lines.
type callpeerLines struct {
	mu    sync.Mutex
	lines []map[string]any
}

func (c *callpeerLines) find(pred func(map[string]any) bool) map[string]any {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, l := range c.lines {
		if pred(l) {
			return l
		}
	}
	return nil
}

func (c *callpeerLines) all() []map[string]any {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]map[string]any(nil), c.lines...)
}

// TestCallpeerExample: the callpeer example (built here) and a Go SDK participant who sends a
// VP8 track and opens a "chat" data channel share a call, in both join orders (so callpeer both
// answers and offers). callpeer reports joined, peer_connected, datachannel_open, track
// (video/VP8) and rtp counts, echoes "hello" as "echo:hello", and exits 0 after leaving on
// SIGTERM.
func TestCallpeerExample(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "callpeer")
	build := exec.Command("go", "build", "-buildvcs=false", "-o", bin, "./examples/callpeer")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./examples/callpeer: %v\n%s", err, out)
	}
	t.Run("callpeer joins first", func(t *testing.T) { testCallpeer(t, bin, true) })
	t.Run("callpeer joins second", func(t *testing.T) { testCallpeer(t, bin, false) })
}

func testCallpeer(t *testing.T, bin string, callpeerFirst bool) {
	srv := startServer(t)
	ctx := ctxT(t)
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "callpeer", Members: []string{"peer"}})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}

	// Alice's side: a VP8 track and a "chat" data channel.
	rt := connect(t, srv.client(t, "alice"))
	discardEvents(rt)
	video, err := webrtc.NewTrackLocalStaticRTP(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8, ClockRate: 90000}, "video", "alice")
	if err != nil {
		t.Fatal(err)
	}
	echoes := make(chan string, 16)
	var chat *webrtc.DataChannel
	var chatMu sync.Mutex
	opts := []parley.CallOption{
		parley.WithLoopbackOnly(), parley.WithTrack(video), parley.WithDataChannel("chat"),
		parley.OnDataChannel(func(_ *parley.Peer, dc *webrtc.DataChannel) {
			dc.OnOpen(func() {
				chatMu.Lock()
				if chat == nil {
					chat = dc
				}
				chatMu.Unlock()
			})
			dc.OnMessage(func(m webrtc.DataChannelMessage) { echoes <- string(m.Data) })
		}),
	}
	var call *parley.Call
	if !callpeerFirst {
		call, err = rt.StartCall(ctx, ch.ID, opts...)
		if err != nil {
			t.Fatalf("alice starts the call: %v", err)
		}
	}

	cmd := exec.Command(bin, "--url", srv.URL, "--token", srv.token(t, "peer"), "--channel", ch.ID, "--timeout", "60s")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &lockedBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	lines := &callpeerLines{}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var m map[string]any
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				t.Errorf("callpeer printed a line that is not JSON: %q", sc.Text())
				continue
			}
			lines.mu.Lock()
			lines.lines = append(lines.lines, m)
			lines.mu.Unlock()
		}
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		if t.Failed() {
			t.Logf("callpeer stderr:\n%s\nstdout lines: %v", stderr.tail(3000), lines.all())
		}
	})
	event := func(name string, pred func(map[string]any) bool) map[string]any {
		t.Helper()
		var found map[string]any
		waitFor(t, 20*time.Second, func() bool {
			found = lines.find(func(l map[string]any) bool { return l["event"] == name && (pred == nil || pred(l)) })
			return found != nil
		}, func() string { return "callpeer event " + name + "; lines so far: " + jsonString(lines.all()) })
		return found
	}
	joined := event("joined", nil)
	if callpeerFirst {
		call, err = rt.JoinCall(ctx, joined["call_id"].(string), opts...)
		if err != nil {
			t.Fatalf("alice joins callpeer's call: %v", err)
		}
	} else if joined["call_id"] != call.ID {
		t.Fatalf("expected callpeer to join the active call %s, got %v", call.ID, joined["call_id"])
	}
	stopVideo := make(chan struct{})
	defer close(stopVideo)
	go func() {
		seq := uint16(0)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopVideo:
				return
			case <-tick.C:
				seq++
				pkt := &rtp.Packet{Header: rtp.Header{Version: 2, Marker: true, SequenceNumber: seq, Timestamp: uint32(seq) * 3000},
					Payload: []byte{0x10, 0x00, 0x9d, 0x01, 0x2a, 0, 0, 0, 0}}
				_ = video.WriteRTP(pkt)
			}
		}
	}()

	event("peer_connected", func(l map[string]any) bool { return l["participant_id"] == call.ParticipantID })
	event("datachannel_open", func(l map[string]any) bool { return l["label"] == "chat" })
	tr := event("track", func(l map[string]any) bool { return l["kind"] == "video" })
	if tr["codec"] != webrtc.MimeTypeVP8 {
		t.Fatalf("expected callpeer to receive VP8, got %v", tr["codec"])
	}
	event("rtp", func(l map[string]any) bool { n, _ := l["packets"].(float64); return l["kind"] == "video" && n > 0 })

	waitFor(t, 20*time.Second, func() bool { chatMu.Lock(); defer chatMu.Unlock(); return chat != nil }, func() string { return "alice's chat channel open" })
	chatMu.Lock()
	_ = chat.SendText("hello")
	chatMu.Unlock()
	select {
	case got := <-echoes:
		if got != "echo:hello" {
			t.Fatalf("expected callpeer to echo %q, got %q", "echo:hello", got)
		}
	case <-time.After(wait):
		t.Fatalf("expected %q back from callpeer within %v", "echo:hello", wait)
	}
	event("datachannel_message", func(l map[string]any) bool { return l["text"] == "hello" })

	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("expected callpeer to exit 0 on SIGTERM, got %v", err)
		}
	case <-time.After(wait):
		t.Fatalf("callpeer did not exit within %v of SIGTERM", wait)
	}
	if lines.find(func(l map[string]any) bool { return l["event"] == "left" }) == nil {
		t.Fatalf("expected a left event before exit; lines: %v", lines.all())
	}
	_ = call.Leave(ctx)
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
