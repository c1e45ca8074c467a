package parley_test

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/pion/webrtc/v4"
	"github.com/pion/webrtc/v4/pkg/media"

	parley "github.com/parley-chat/parley/sdk/go"
)

// sfuCounter counts the RTP packets that arrive through the SFU, per publisher and kind, as
// bound when each packet arrives.
type sfuCounter struct {
	mu     sync.Mutex
	counts map[string]int // "<publisher>/<kind>"
}

func (s *sfuCounter) get(publisher, kind string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[publisher+"/"+kind]
}

func (s *sfuCounter) option() parley.CallOption {
	s.counts = map[string]int{}
	return parley.OnSFUTrack(func(c *parley.Call, mid string, t *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
		kind := t.Kind().String()
		go func() {
			for {
				if _, _, err := t.ReadRTP(); err != nil {
					return
				}
				if b, ok := c.SFUBinding(mid); ok {
					s.mu.Lock()
					s.counts[b.ParticipantID+"/"+kind]++
					s.mu.Unlock()
				}
			}
		}()
	})
}

// syntheticMedia publishes a VP8 track (30 frames a second, each a keyframe header with
// filler) and an Opus track (20 ms silence frames) until ctx ends.
func syntheticMedia(t *testing.T, ctx context.Context, name string) []parley.CallOption {
	t.Helper()
	video, err := webrtc.NewTrackLocalStaticSample(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8, ClockRate: 90000}, "video", name)
	if err != nil {
		t.Fatal(err)
	}
	audio, err := webrtc.NewTrackLocalStaticSample(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2}, "audio", name)
	if err != nil {
		t.Fatal(err)
	}
	frame := make([]byte, 600)
	size := uint32(len(frame) - 10)
	// A key frame, version 0, shown, with its first partition size; the start code; 320×240.
	tag := 1<<4 | size<<5
	copy(frame, []byte{byte(tag), byte(tag >> 8), byte(tag >> 16), 0x9d, 0x01, 0x2a, 64, 1, 240, 0})
	go func() {
		vt, at := time.NewTicker(time.Second/30), time.NewTicker(20*time.Millisecond)
		defer vt.Stop()
		defer at.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-vt.C:
				_ = video.WriteSample(media.Sample{Data: frame, Duration: time.Second / 30})
			case <-at.C:
				_ = audio.WriteSample(media.Sample{Data: []byte{0xf8, 0xff, 0xfe}, Duration: 20 * time.Millisecond})
			}
		}
	}()
	return []parley.CallOption{parley.WithTrack(video), parley.WithTrack(audio)}
}

// TestCallSFUEscalation: three Go participants publishing VP8 and Opus, against a server whose
// in-process SFU escalates calls at 3 participants. Two start peer to peer; the third join
// escalates the call, and every Call moves to the SFU by itself (Mode, one SFU connection, P2P
// peers closed) and receives both others' video and audio through it. Then an unsubscribe stops
// one publisher's video to one subscriber (the slot is unbound) and a subscribe brings it back.
func TestCallSFUEscalation(t *testing.T) {
	srv := startServer(t, "--sfu-listen", "127.0.0.1:0", "--sfu-threshold", "3")
	ctx := ctxT(t)
	users := []string{"alice", "bob", "carol"}
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "sfu", Members: users[1:]})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	mediaCtx, stopMedia := context.WithCancel(ctx)
	defer stopMedia()
	counters := make([]*sfuCounter, len(users))
	calls := make([]*parley.Call, len(users))
	modes := make([]chan parley.CallMode, len(users))
	for i, u := range users {
		rt := connect(t, srv.client(t, u))
		discardEvents(rt)
		counters[i] = &sfuCounter{}
		modes[i] = make(chan parley.CallMode, 4)
		m := modes[i]
		opts := append(syntheticMedia(t, mediaCtx, u),
			parley.WithLoopbackOnly(),
			counters[i].option(),
			parley.OnModeChange(func(mode parley.CallMode) { m <- mode }),
		)
		if u == "carol" {
			// One slot per kind for two others: the SFU asks for more and carol offers again.
			opts = append(opts, parley.WithSFUSlots(1, 1))
		}
		calls[i], err = rt.StartCall(ctx, ch.ID, opts...)
		if err != nil {
			t.Fatalf("%s joins: %v", u, err)
		}
		if i == 1 {
			if calls[0].Mode() != parley.ModeP2P || calls[1].Mode() != parley.ModeP2P {
				t.Fatalf("expected two participants to talk peer to peer, got %s and %s", calls[0].Mode(), calls[1].Mode())
			}
			waitFor(t, 20*time.Second, func() bool {
				p, ok := calls[0].Peer(calls[1].ParticipantID)
				return ok && p.PeerConnection().ConnectionState() == webrtc.PeerConnectionStateConnected
			}, func() string { return "alice and bob connected peer to peer" })
		}
	}
	if calls[2].Mode() != parley.ModeSFU {
		t.Fatalf("expected the third join to answer in sfu mode, got %s", calls[2].Mode())
	}
	for i := 0; i < 2; i++ {
		select {
		case m := <-modes[i]:
			if m != parley.ModeSFU {
				t.Fatalf("expected %s's mode to change to sfu, got %s", users[i], m)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("expected %s's call to move to the SFU within 20 s", users[i])
		}
	}

	// Everyone receives both others' video and audio through the SFU; the mesh is gone.
	for i := range users {
		for j := range users {
			if i == j {
				continue
			}
			for _, kind := range []string{"video", "audio"} {
				waitFor(t, 30*time.Second, func() bool { return counters[i].get(calls[j].ParticipantID, kind) > 60 }, func() string {
					return users[i] + " receiving " + users[j] + "'s " + kind + " through the SFU (got " +
						itoa(counters[i].get(calls[j].ParticipantID, kind)) + " packets)"
				})
			}
		}
		waitFor(t, 20*time.Second, func() bool { return len(calls[i].Peers()) == 0 }, func() string { return users[i] + "'s P2P peers closed" })
		if calls[i].SFUConnection() == nil || calls[i].SFUConnection().ConnectionState() != webrtc.PeerConnectionStateConnected {
			t.Fatalf("expected %s's SFU connection to be connected", users[i])
		}
	}

	// Carol opened one slot per kind and was asked for one more of each.
	slots := map[webrtc.RTPCodecType]int{}
	for _, tr := range calls[2].SFUConnection().GetTransceivers() {
		if tr.Direction() == webrtc.RTPTransceiverDirectionRecvonly {
			slots[tr.Kind()]++
		}
	}
	if slots[webrtc.RTPCodecTypeAudio] != 2 || slots[webrtc.RTPCodecTypeVideo] != 2 {
		t.Fatalf("expected carol to have added a receive slot of each kind when asked (2 audio, 2 video), got %v", slots)
	}

	// Alice unsubscribes from bob's video: its slot is unbound and no more of it arrives.
	bobVideo := ""
	for _, tr := range calls[0].RemoteTracks() {
		if tr.ParticipantID == calls[1].ParticipantID && tr.Kind == "video" {
			bobVideo = tr.TrackID
		}
	}
	if bobVideo == "" {
		t.Fatalf("expected alice to know bob's video track, got %+v", calls[0].RemoteTracks())
	}
	if err := calls[0].Unsubscribe(ctx, bobVideo); err != nil {
		t.Fatalf("unsubscribe: %v", err)
	}
	waitFor(t, 10*time.Second, func() bool {
		for _, tr := range calls[0].RemoteTracks() {
			if tr.TrackID == bobVideo {
				return !tr.Subscribed && tr.Mid == ""
			}
		}
		return false
	}, func() string { return "bob's video unbound from alice's slot" })
	stopped := counters[0].get(calls[1].ParticipantID, "video")
	time.Sleep(time.Second)
	if n := counters[0].get(calls[1].ParticipantID, "video"); n != stopped {
		t.Fatalf("expected no more of bob's video at alice after unsubscribing, got %d more packets", n-stopped)
	}
	if got := counters[0].get(calls[2].ParticipantID, "video"); got == 0 {
		t.Fatal("expected carol's video to keep reaching alice")
	}
	if err := calls[0].Subscribe(ctx, bobVideo, parley.VideoPrefs{MaxWidth: 320, MaxHeight: 240}); err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	waitFor(t, 20*time.Second, func() bool { return counters[0].get(calls[1].ParticipantID, "video") > stopped+30 }, func() string {
		return "bob's video reaching alice again after subscribing"
	})
	for _, c := range calls {
		_ = c.Leave(ctx)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// TestCallSFUFailover: a core (no SFU of its own, every call on the SFU) and two `--role sfu`
// processes on NATS. Three Go participants publish through the SFU that holds the call; it is
// killed with SIGKILL; the core moves the call to the other SFU (`call.mode_changed`,
// `sfu_failover`), and every Call moves by itself — it joins again for a credential, opens a new
// SFU connection — so that each receives both others' video again within 10 s of the kill.
// Needs NATS: PARLEY_TEST_NATS_URL (scripts/test.sh starts it).
func TestCallSFUFailover(t *testing.T) {
	nats := os.Getenv("PARLEY_TEST_NATS_URL")
	if nats == "" {
		t.Fatal("PARLEY_TEST_NATS_URL is not set: run the tests with scripts/test.sh, or start the services with `eval \"$(scripts/services.sh start)\"` first")
	}
	const secret = "sdk-go-failover-secret"
	sfus := []*server{
		startServer(t, "--role", "sfu", "--nats-url", nats, "--sfu-secret", secret),
		startServer(t, "--role", "sfu", "--nats-url", nats, "--sfu-secret", secret),
	}
	srv := startServer(t, "--dev", "--nats-url", nats, "--no-sfu", "--sfu-always", "--sfu-secret", secret)
	time.Sleep(1500 * time.Millisecond) // the SFUs announce themselves every 500 ms
	ctx := ctxT(t)
	users := []string{"alice", "bob", "carol"}
	ch, err := srv.client(t, "alice").CreateChannel(ctx, parley.CreateChannelParams{Kind: parley.KindChannel, Name: "failover", Members: users[1:]})
	if err != nil {
		t.Fatalf("create channel: %v", err)
	}
	mediaCtx, stopMedia := context.WithCancel(ctx)
	defer stopMedia()
	counters := make([]*sfuCounter, len(users))
	calls := make([]*parley.Call, len(users))
	for i, u := range users {
		rt := connect(t, srv.client(t, u))
		discardEvents(rt)
		counters[i] = &sfuCounter{}
		opts := append(syntheticMedia(t, mediaCtx, u), parley.WithLoopbackOnly(), counters[i].option())
		calls[i], err = rt.StartCall(ctx, ch.ID, opts...)
		if err != nil {
			t.Fatalf("%s joins: %v", u, err)
		}
		if calls[i].Mode() != parley.ModeSFU {
			t.Fatalf("expected the call on the SFU from the start (--sfu-always), got %s", calls[i].Mode())
		}
	}
	receivingAll := func(more []int) bool {
		for i := range users {
			for j := range users {
				if i != j && counters[i].get(calls[j].ParticipantID, "video") <= more[i*len(users)+j] {
					return false
				}
			}
		}
		return true
	}
	snapshot := func(plus int) []int {
		out := make([]int, len(users)*len(users))
		for i := range users {
			for j := range users {
				out[i*len(users)+j] = counters[i].get(calls[j].ParticipantID, "video") + plus
			}
		}
		return out
	}
	base := make([]int, len(users)*len(users))
	for i := range base {
		base[i] = 30
	}
	waitFor(t, 30*time.Second, func() bool { return receivingAll(base) }, func() string {
		return "everyone receiving both others' video through the first SFU"
	})
	// The SFU holding the call: the one with three participants.
	holder := -1
	for i, s := range sfus {
		var status struct {
			Participants int `json:"participants"`
		}
		resp, err := http.Get(s.URL + "/v1/sfu")
		if err != nil {
			t.Fatalf("SFU status: %v", err)
		}
		_ = json.NewDecoder(resp.Body).Decode(&status)
		resp.Body.Close()
		if status.Participants == 3 {
			holder = i
		}
	}
	if holder < 0 {
		t.Fatal("expected one SFU to hold the call's three participants")
	}
	_ = sfus[holder].cmd.Process.Kill()
	killed := time.Now()
	after := snapshot(30)
	waitFor(t, 10*time.Second, func() bool { return receivingAll(after) }, func() string {
		return "everyone receiving both others' video again through the other SFU within 10 s of the kill"
	})
	t.Logf("media flowed again %v after the kill", time.Since(killed).Round(10*time.Millisecond))
	for _, c := range calls {
		_ = c.Leave(ctx)
	}
}
