package parley

import (
	"net"

	"github.com/pion/ice/v4"
	"github.com/pion/interceptor"
	"github.com/pion/webrtc/v4"
)

// CallOption configures a Call.
type CallOption func(*callConfig)

type callConfig struct {
	settingEngine *webrtc.SettingEngine
	mediaEngine   *webrtc.MediaEngine
	loopbackOnly  bool
	iceServers    []webrtc.ICEServer
	ownICEServers bool
	dataChannels  []string
	recvKinds     []webrtc.RTPCodecType
	tracks        []webrtc.TrackLocal
	onTrack       func(*Peer, *webrtc.TrackRemote, *webrtc.RTPReceiver)
	onDataChannel func(*Peer, *webrtc.DataChannel)
	onPeerState   func(*Peer, webrtc.PeerConnectionState)
	onSFUTrack    func(*Call, string, *webrtc.TrackRemote, *webrtc.RTPReceiver)
	onSFUState    func(webrtc.PeerConnectionState)
	onMode        func(CallMode)
	onSpeaker     func(string)
	sfuSlots      *[2]int
}

// WithSFUSlots sets how many receive slots (audio, video) the connection to the SFU opens up
// front. Default: one of each per other participant. When the SFU binds more tracks than there
// are slots it asks for more, and the Call adds them and offers again.
func WithSFUSlots(audio, video int) CallOption {
	return func(c *callConfig) { c.sfuSlots = &[2]int{audio, video} }
}

// OnSFUTrack calls fn for every receive slot on which media from the SFU arrives, with the
// slot's mid; fn must read the track's RTP (in a goroutine). Call.SFUBinding(mid) says whose
// track the slot carries at any moment (the SFU may bind a slot to another track later).
// Without OnSFUTrack, the media is read and discarded.
func OnSFUTrack(fn func(c *Call, mid string, t *webrtc.TrackRemote, r *webrtc.RTPReceiver)) CallOption {
	return func(c *callConfig) { c.onSFUTrack = fn }
}

// OnSFUStateChange calls fn for every connection state change of the connection to the SFU.
func OnSFUStateChange(fn func(webrtc.PeerConnectionState)) CallOption {
	return func(c *callConfig) { c.onSFUState = fn }
}

// OnModeChange calls fn when the call's mode changes (ModeSFU after an escalation; the Call
// moves its media to the SFU by itself). fn runs on the call's goroutine: do not block in it.
func OnModeChange(fn func(CallMode)) CallOption {
	return func(c *callConfig) { c.onMode = fn }
}

// OnActiveSpeaker calls fn with the participant the SFU announces as speaking ("" for nobody).
// fn runs on the call's goroutine: do not block in it.
func OnActiveSpeaker(fn func(participantID string)) CallOption {
	return func(c *callConfig) { c.onSpeaker = fn }
}

// WithSettingEngine sets the pion SettingEngine of every PeerConnection of the call (network
// types, IP filters, timeouts, ports). WithLoopbackOnly adjusts a copy of it.
func WithSettingEngine(se webrtc.SettingEngine) CallOption {
	return func(c *callConfig) { c.settingEngine = &se }
}

// WithMediaEngine sets the codecs offered and accepted (default: pion's default codecs, which
// include Opus, VP8, VP9 and H.264, with its default interceptors: NACK, RTCP reports, TWCC).
func WithMediaEngine(me *webrtc.MediaEngine) CallOption {
	return func(c *callConfig) { c.mediaEngine = me }
}

// WithLoopbackOnly keeps all media on 127.0.0.1: loopback host candidates only, UDP over IPv4
// only, no mDNS, no STUN or TURN servers, and remote candidates other than 127.0.0.1 dropped,
// so no packet goes to any other address of the machine. For tests and local tools.
func WithLoopbackOnly() CallOption {
	return func(c *callConfig) { c.loopbackOnly = true }
}

// WithICEServers replaces the ICE servers handed out by Parley.
func WithICEServers(servers []webrtc.ICEServer) CallOption {
	return func(c *callConfig) { c.iceServers, c.ownICEServers = servers, true }
}

// WithDataChannel opens a data channel with this label to every peer of the call.
func WithDataChannel(label string) CallOption {
	return func(c *callConfig) { c.dataChannels = append(c.dataChannels, label) }
}

// WithReceive adds a receive-only transceiver of each kind to the connections this participant
// offers, so that peers can send media of that kind without a renegotiation.
func WithReceive(kinds ...webrtc.RTPCodecType) CallOption {
	return func(c *callConfig) { c.recvKinds = append(c.recvKinds, kinds...) }
}

// WithTrack publishes a local track to every peer (see also Call.AddTrack).
func WithTrack(t webrtc.TrackLocal) CallOption {
	return func(c *callConfig) { c.tracks = append(c.tracks, t) }
}

// OnTrack calls fn for every remote track; fn must read the track's RTP (in a goroutine).
// Without OnTrack, remote tracks are read and discarded.
func OnTrack(fn func(*Peer, *webrtc.TrackRemote, *webrtc.RTPReceiver)) CallOption {
	return func(c *callConfig) { c.onTrack = fn }
}

// OnDataChannel calls fn for every data channel of the call: those a peer opens, and those this
// side opens (WithDataChannel), before they open. Set the channel's handlers in fn and return:
// fn may run on the call's goroutine, so calling the Call's methods from it must be done in a
// goroutine of its own.
func OnDataChannel(fn func(*Peer, *webrtc.DataChannel)) CallOption {
	return func(c *callConfig) { c.onDataChannel = fn }
}

// OnPeerStateChange calls fn for every connection state change of a peer's PeerConnection.
func OnPeerStateChange(fn func(*Peer, webrtc.PeerConnectionState)) CallOption {
	return func(c *callConfig) { c.onPeerState = fn }
}

// LoopbackSettingEngine returns a SettingEngine restricted to 127.0.0.1 (what WithLoopbackOnly
// uses), applied on top of se.
func LoopbackSettingEngine(se webrtc.SettingEngine) webrtc.SettingEngine {
	se.SetIncludeLoopbackCandidate(true)
	se.SetNetworkTypes([]webrtc.NetworkType{webrtc.NetworkTypeUDP4})
	se.SetInterfaceFilter(func(name string) bool {
		iface, err := net.InterfaceByName(name)
		return err == nil && iface.Flags&net.FlagLoopback != 0
	})
	se.SetIPFilter(isLocalhost)
	se.SetRemoteIPFilter(isLocalhost)
	se.SetICEMulticastDNSMode(ice.MulticastDNSModeDisabled)
	return se
}

var localhost = net.IPv4(127, 0, 0, 1)

func isLocalhost(ip net.IP) bool { return ip.Equal(localhost) }

// api builds the pion API of a call.
func (cfg *callConfig) api() (*webrtc.API, error) {
	se := webrtc.SettingEngine{}
	if cfg.settingEngine != nil {
		se = *cfg.settingEngine
	}
	if cfg.loopbackOnly {
		se = LoopbackSettingEngine(se)
	}
	me := cfg.mediaEngine
	if me == nil {
		me = &webrtc.MediaEngine{}
		if err := me.RegisterDefaultCodecs(); err != nil {
			return nil, err
		}
	}
	ir := &interceptor.Registry{}
	if err := webrtc.RegisterDefaultInterceptors(me, ir); err != nil {
		return nil, err
	}
	return webrtc.NewAPI(webrtc.WithSettingEngine(se), webrtc.WithMediaEngine(me), webrtc.WithInterceptorRegistry(ir)), nil
}

// rtcConfiguration is the PeerConnection configuration of a call.
func (cfg *callConfig) rtcConfiguration(servers []ICEServer) webrtc.Configuration {
	var out []webrtc.ICEServer
	switch {
	case cfg.loopbackOnly:
		// No STUN or TURN: they are other addresses.
	case cfg.ownICEServers:
		out = cfg.iceServers
	default:
		for _, s := range servers {
			ws := webrtc.ICEServer{URLs: s.URLs}
			if s.Username != "" {
				ws.Username = s.Username
				ws.Credential = s.Credential
			}
			out = append(out, ws)
		}
	}
	return webrtc.Configuration{ICEServers: out}
}
