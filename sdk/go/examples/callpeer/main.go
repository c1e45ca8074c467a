// Command callpeer is a Go (pion) call participant for tests and demos: it joins the call of a
// channel through the Go SDK, negotiates with every other participant on 127.0.0.1 only, echoes
// the text it receives on data channels, counts the RTP packets of the tracks it receives, and
// reports all of it as JSON lines on stdout.
//
//	callpeer --url http://127.0.0.1:8080 --token "$JWT" --channel ch_01... --timeout 60s
//
// Events (one JSON object per line):
//
//	{"event":"joined","call_id":"…","participant_id":"…"}
//	{"event":"peer_connected","participant_id":"…"}
//	{"event":"datachannel_open","label":"chat","participant_id":"…"}
//	{"event":"datachannel_message","text":"…","label":"…","participant_id":"…"}
//	{"event":"track","kind":"video","codec":"video/VP8","participant_id":"…","track_id":"…"}
//	{"event":"rtp","kind":"video","packets":N,"participant_id":"…","track_id":"…"}   (≤ 1/s per track)
//	{"event":"mode","mode":"sfu"}                       (the call escalated to the SFU)
//	{"event":"sfu_state","state":"connected"}          (the connection to the SFU)
//	{"event":"sfu_rtp","kind":"video","publisher":"…","packets":N}   (through the SFU, per publisher and kind, ≤ 1/s)
//	{"event":"speaker","participant_id":"…"}          (the SFU's active speaker)
//	{"event":"left","call_id":"…"}
//	{"event":"error","error":"…"}
//
// With --publish it sends synthetic media too: VP8 video (every frame a keyframe with a 320×240
// header, not decodable) and Opus silence, so that others count its packets.
//
// It exits 0 after leaving the call on SIGINT, SIGTERM or when --timeout passes, and 1 when it
// cannot join.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pion/webrtc/v4"
	"github.com/pion/webrtc/v4/pkg/media"

	parley "github.com/parley-chat/parley/sdk/go"
)

func main() {
	url := flag.String("url", "", "Parley base URL, e.g. http://127.0.0.1:8080")
	token := flag.String("token", "", "access token (JWT) of the participant")
	channel := flag.String("channel", "", "id of the channel whose call to join")
	timeout := flag.Duration("timeout", 60*time.Second, "leave the call and exit after this long")
	verbose := flag.Bool("verbose", false, "log SDK diagnostics on stderr")
	publish := flag.Bool("publish", false, "send synthetic VP8 video and Opus audio")
	flag.Parse()
	if *url == "" || *token == "" || *channel == "" {
		fmt.Fprintln(os.Stderr, "callpeer: --url, --token and --channel are required")
		flag.Usage()
		os.Exit(2)
	}
	out := &output{enc: json.NewEncoder(os.Stdout)}
	if err := run(*url, *token, *channel, *timeout, *verbose, *publish, out); err != nil {
		out.emit(map[string]any{"event": "error", "error": err.Error()})
		os.Exit(1)
	}
}

// output writes one JSON object per line, from any goroutine.
type output struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (o *output) emit(v map[string]any) {
	o.mu.Lock()
	defer o.mu.Unlock()
	_ = o.enc.Encode(v)
}

func run(url, token, channel string, timeout time.Duration, verbose, publish bool, out *output) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	client, err := parley.New(url, parley.WithToken(token))
	if err != nil {
		return err
	}
	var rtOpts []parley.RealtimeOption
	if verbose {
		rtOpts = append(rtOpts, parley.WithLogger(slog.New(slog.NewTextHandler(os.Stderr, nil))))
	}
	joinCtx, joinCancel := context.WithTimeout(ctx, 20*time.Second)
	defer joinCancel()
	rt, err := client.Connect(joinCtx, rtOpts...)
	if err != nil {
		return fmt.Errorf("connecting: %w", err)
	}
	defer rt.Close()
	go func() {
		for range rt.Events() {
			// Drained: the SDK routes call events to the call.
		}
	}()

	counters := &rtpCounters{out: out}
	sfuCounters := newSFUCounters(out)
	var media []parley.CallOption
	if publish {
		video, audio, err := syntheticTracks(ctx)
		if err != nil {
			return err
		}
		media = append(media, parley.WithTrack(video), parley.WithTrack(audio))
	}
	call, err := rt.StartCall(joinCtx, channel, append(media,
		parley.WithLoopbackOnly(),
		parley.WithMediaEngine(mediaEngine()),
		parley.WithReceive(webrtc.RTPCodecTypeVideo, webrtc.RTPCodecTypeAudio),
		parley.WithDataChannel("chat"),
		parley.OnDataChannel(func(p *parley.Peer, dc *webrtc.DataChannel) { serveDataChannel(out, p, dc) }),
		parley.OnTrack(func(p *parley.Peer, t *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
			out.emit(map[string]any{"event": "track", "kind": t.Kind().String(), "codec": t.Codec().MimeType,
				"participant_id": p.ParticipantID, "track_id": t.ID()})
			go counters.count(ctx, p.ParticipantID, t)
		}),
		parley.OnPeerStateChange(func(p *parley.Peer, s webrtc.PeerConnectionState) {
			if s == webrtc.PeerConnectionStateConnected {
				out.emit(map[string]any{"event": "peer_connected", "participant_id": p.ParticipantID})
			}
		}),
		parley.OnModeChange(func(m parley.CallMode) { out.emit(map[string]any{"event": "mode", "mode": string(m)}) }),
		parley.OnSFUStateChange(func(s webrtc.PeerConnectionState) {
			out.emit(map[string]any{"event": "sfu_state", "state": s.String()})
		}),
		parley.OnActiveSpeaker(func(id string) { out.emit(map[string]any{"event": "speaker", "participant_id": id}) }),
		parley.OnSFUTrack(func(c *parley.Call, mid string, t *webrtc.TrackRemote, _ *webrtc.RTPReceiver) {
			go sfuCounters.count(ctx, c, mid, t)
		}),
	)...)
	if err != nil {
		return fmt.Errorf("joining the call of %s: %w", channel, err)
	}
	out.emit(map[string]any{"event": "joined", "call_id": call.ID, "participant_id": call.ParticipantID, "mode": string(call.Mode())})
	go sfuCounters.report(ctx)

	select {
	case <-ctx.Done():
	case <-call.Done():
	}
	leaveCtx, leaveCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer leaveCancel()
	if err := call.Leave(leaveCtx); err != nil && !errors.Is(err, parley.ErrNotFound) {
		fmt.Fprintln(os.Stderr, "callpeer: leave:", err)
	}
	out.emit(map[string]any{"event": "left", "call_id": call.ID})
	return nil
}

// mediaEngine offers and accepts VP8 and Opus (what Chromium sends by default), plus H.264 and
// VP9 via pion's defaults.
func mediaEngine() *webrtc.MediaEngine {
	me := &webrtc.MediaEngine{}
	if err := me.RegisterDefaultCodecs(); err != nil {
		panic(fmt.Sprintf("pion default codecs: %v", err)) // static configuration: a bug
	}
	return me
}

// serveDataChannel reports a data channel and echoes its text messages ("echo:" + text); a
// message that is itself an echo is not echoed back, so two callpeers do not loop.
func serveDataChannel(out *output, p *parley.Peer, dc *webrtc.DataChannel) {
	dc.OnOpen(func() {
		out.emit(map[string]any{"event": "datachannel_open", "label": dc.Label(), "participant_id": p.ParticipantID})
	})
	dc.OnMessage(func(m webrtc.DataChannelMessage) {
		if !m.IsString {
			return
		}
		text := string(m.Data)
		out.emit(map[string]any{"event": "datachannel_message", "text": text, "label": dc.Label(), "participant_id": p.ParticipantID})
		if !strings.HasPrefix(text, "echo:") {
			_ = dc.SendText("echo:" + text)
		}
	})
}

// rtpCounters counts the RTP packets of each received track and reports the counts at most
// once a second per track, while packets arrive.
type rtpCounters struct {
	out *output
}

func (c *rtpCounters) count(ctx context.Context, participant string, t *webrtc.TrackRemote) {
	var packets atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, _, err := t.ReadRTP(); err != nil {
				return
			}
			packets.Add(1)
		}
	}()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var reported int64
	report := func() {
		if n := packets.Load(); n != reported {
			reported = n
			c.out.emit(map[string]any{"event": "rtp", "kind": t.Kind().String(), "packets": n,
				"participant_id": participant, "track_id": t.ID()})
		}
	}
	for {
		select {
		case <-tick.C:
			report()
		case <-done:
			return
		case <-ctx.Done():
			return
		}
	}
}

// sfuCounters counts the RTP packets that arrive through the SFU per publisher and kind: a
// receive slot may carry another publisher's track later, so each packet counts for the
// publisher bound to its slot when it arrives.
type sfuCounters struct {
	out    *output
	mu     sync.Mutex
	counts map[[2]string]int64
}

func newSFUCounters(out *output) *sfuCounters {
	return &sfuCounters{out: out, counts: map[[2]string]int64{}}
}

func (s *sfuCounters) count(ctx context.Context, c *parley.Call, mid string, t *webrtc.TrackRemote) {
	kind := t.Kind().String()
	for ctx.Err() == nil {
		if _, _, err := t.ReadRTP(); err != nil {
			return
		}
		b, ok := c.SFUBinding(mid)
		if !ok {
			continue
		}
		s.mu.Lock()
		s.counts[[2]string{b.ParticipantID, kind}]++
		s.mu.Unlock()
	}
}

// report prints the counts that changed, once a second.
func (s *sfuCounters) report(ctx context.Context) {
	reported := map[[2]string]int64{}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		s.mu.Lock()
		for k, n := range s.counts {
			if reported[k] != n {
				reported[k] = n
				s.out.emit(map[string]any{"event": "sfu_rtp", "publisher": k[0], "kind": k[1], "packets": n})
			}
		}
		s.mu.Unlock()
	}
}

// syntheticTracks returns a VP8 and an Opus track fed with synthetic samples until ctx ends:
// 30 VP8 frames a second, each a keyframe (a valid frame tag and 320×240 header, then filler;
// counted by receivers, not decodable), and 50 Opus silence frames a second.
func syntheticTracks(ctx context.Context) (*webrtc.TrackLocalStaticSample, *webrtc.TrackLocalStaticSample, error) {
	video, err := webrtc.NewTrackLocalStaticSample(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeVP8, ClockRate: 90000}, "video", "callpeer")
	if err != nil {
		return nil, nil, err
	}
	audio, err := webrtc.NewTrackLocalStaticSample(webrtc.RTPCodecCapability{MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2}, "audio", "callpeer")
	if err != nil {
		return nil, nil, err
	}
	frame := vp8Keyframe(320, 240, 900)
	go func() {
		tick := time.NewTicker(time.Second / 30)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				_ = video.WriteSample(media.Sample{Data: frame, Duration: time.Second / 30})
			}
		}
	}()
	go func() {
		silence := []byte{0xf8, 0xff, 0xfe} // an Opus frame of 20 ms silence
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				_ = audio.WriteSample(media.Sample{Data: silence, Duration: 20 * time.Millisecond})
			}
		}
	}()
	return video, audio, nil
}

// vp8Keyframe is a VP8 keyframe header (RFC 6386 §9.1: frame tag with the key frame bit clear,
// version 0, show_frame, first partition size; start code; width and height) and filler.
func vp8Keyframe(width, height uint16, size int) []byte {
	f := make([]byte, size)
	partition := uint32(size - 10)
	tag := uint32(0) | 0<<1 | 1<<4 | partition<<5 // key frame, version 0, shown
	f[0], f[1], f[2] = byte(tag), byte(tag>>8), byte(tag>>16)
	f[3], f[4], f[5] = 0x9d, 0x01, 0x2a
	f[6], f[7] = byte(width), byte(width>>8)
	f[8], f[9] = byte(height), byte(height>>8)
	for i := 10; i < size; i++ {
		f[i] = byte(i)
	}
	return f
}
