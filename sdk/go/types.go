package parley

import (
	"encoding/json"
	"time"
)

// ChannelKind is the kind of a channel.
type ChannelKind string

const (
	KindChannel ChannelKind = "channel"
	KindDM      ChannelKind = "dm"
)

// MemberRole is a member's role in a channel.
type MemberRole string

const (
	RoleOwner     MemberRole = "owner"
	RoleModerator MemberRole = "moderator"
	RoleMember    MemberRole = "member"
)

// Channel is a channel or DM as the API returns it.
type Channel struct {
	ID        string      `json:"id"`
	Kind      ChannelKind `json:"kind"`
	Name      string      `json:"name,omitempty"`
	CreatedBy string      `json:"created_by"`
	CreatedAt time.Time   `json:"created_at"`
	// LastSeq is the seq of the newest persisted event of the channel.
	LastSeq uint64 `json:"last_seq"`
	// Role is the caller's role (when returned to a member).
	Role MemberRole `json:"role,omitempty"`
	// LastReadSeq and UnreadCount are the caller's read state (in ListChannels).
	LastReadSeq uint64 `json:"last_read_seq,omitempty"`
	UnreadCount uint64 `json:"unread_count,omitempty"`
}

// Member is a member of a channel.
type Member struct {
	UserID      string     `json:"user_id"`
	Role        MemberRole `json:"role"`
	JoinedAt    time.Time  `json:"joined_at"`
	LastReadSeq uint64     `json:"last_read_seq"`
}

// Message is a chat message. A deleted message stays as a tombstone (Deleted, empty Text).
type Message struct {
	ID          string          `json:"id"`
	ChannelID   string          `json:"channel_id"`
	Seq         uint64          `json:"seq"`
	SenderID    string          `json:"sender_id"`
	ClientMsgID string          `json:"client_msg_id"`
	Text        string          `json:"text"`
	Metadata    json.RawMessage `json:"metadata,omitempty"`
	CreatedAt   time.Time       `json:"created_at"`
	EditedAt    *time.Time      `json:"edited_at,omitempty"`
	Deleted     bool            `json:"deleted"`
}

// SendResult is the outcome of a send: the message, and whether this call created it (false
// for an idempotent retry of a client_msg_id already used).
type SendResult struct {
	Message Message `json:"message"`
	Created bool    `json:"created"`
}

// MessagePage is a page of history, ascending by seq.
type MessagePage struct {
	Messages  []Message `json:"messages"`
	HasBefore bool      `json:"has_before"`
	HasAfter  bool      `json:"has_after"`
}

// ReadState is the caller's read position in a channel.
type ReadState struct {
	ChannelID   string `json:"channel_id"`
	LastReadSeq uint64 `json:"last_read_seq"`
	UnreadCount uint64 `json:"unread_count"`
}

// PresenceStatus is a user's status.
type PresenceStatus string

const (
	StatusOnline  PresenceStatus = "online"
	StatusAway    PresenceStatus = "away"
	StatusOffline PresenceStatus = "offline"
)

// Presence is a user's presence.
type Presence struct {
	UserID     string         `json:"user_id"`
	Status     PresenceStatus `json:"status"`
	LastSeen   *time.Time     `json:"last_seen,omitempty"`
	LastActive *time.Time     `json:"last_active,omitempty"`
}

// TypingState is the state of a typing indicator.
type TypingState string

const (
	TypingStart TypingState = "start"
	TypingStop  TypingState = "stop"
)

// CallMode says how media flows in a call.
type CallMode string

const (
	ModeP2P CallMode = "p2p"
	ModeSFU CallMode = "sfu"
)

// CallInfo is a call of a channel. One call per channel is active at a time.
type CallInfo struct {
	ID        string   `json:"id"`
	ChannelID string   `json:"channel_id"`
	Mode      CallMode `json:"mode"`
	// SFUSession names the call's SFU assignment in sfu mode (it changes when the call moves
	// to another SFU process).
	SFUSession   string            `json:"sfu_session,omitempty"`
	StartedBy    string            `json:"started_by"`
	StartedAt    time.Time         `json:"started_at"`
	EndedAt      *time.Time        `json:"ended_at,omitempty"`
	Participants []CallParticipant `json:"participants"`
}

// CallParticipant is a participant of a call, present or past.
type CallParticipant struct {
	ParticipantID string     `json:"participant_id"`
	UserID        string     `json:"user_id"`
	JoinedAt      time.Time  `json:"joined_at"`
	LeftAt        *time.Time `json:"left_at,omitempty"`
}

// NegotiationRole is a participant's role in perfect negotiation with one peer.
type NegotiationRole string

const (
	Polite   NegotiationRole = "polite"
	Impolite NegotiationRole = "impolite"
)

// CallPeer is a participant already in a call when someone joins, with the joiner's role
// towards it.
type CallPeer struct {
	ParticipantID string          `json:"participant_id"`
	UserID        string          `json:"user_id"`
	Role          NegotiationRole `json:"role"`
}

// ICEServer is a STUN or TURN server handed out by the API.
type ICEServer struct {
	URLs       []string `json:"urls"`
	Username   string   `json:"username,omitempty"`
	Credential string   `json:"credential,omitempty"`
}

// JoinedCall is the answer to a join.
type JoinedCall struct {
	Call          CallInfo    `json:"call"`
	ParticipantID string      `json:"participant_id"`
	Peers         []CallPeer  `json:"peers"`
	ICEServers    []ICEServer `json:"ice_servers"`
	// SFU is there when the call is in sfu mode: the credential for the SFU connection.
	SFU *SFUJoin `json:"sfu,omitempty"`
}

// SFUJoin is the SFU block of a join answer (docs/calls.md, "The join answer in sfu mode").
type SFUJoin struct {
	Session    string `json:"session"`
	Credential string `json:"credential"`
	// ExpiresAt is Unix seconds.
	ExpiresAt int64 `json:"expires_at"`
}

// SessionLimits are the limits stated in the welcome frame.
type SessionLimits struct {
	MaxFrameBytes   int `json:"max_frame_bytes"`
	MaxTextChars    int `json:"max_text_chars"`
	FramesPerSecond int `json:"frames_per_second"`
	FrameBurst      int `json:"frame_burst"`
	// FloodCloseAfter refused frames close the connection (4008); the count drains at
	// FramesPerSecond per second.
	FloodCloseAfter int   `json:"flood_close_after"`
	SendQueue       int   `json:"send_queue"`
	MaxReplay       int64 `json:"max_replay"`
	// MaxResumeChannels is the most channels one resume frame may name; the client splits
	// larger resumes.
	MaxResumeChannels int   `json:"max_resume_channels"`
	ResumeWindowMS    int64 `json:"resume_window_ms"`
	PresenceGraceMS   int64 `json:"presence_grace_ms"`
	TypingThrottleMS  int64 `json:"typing_throttle_ms"`
}

// Welcome is the server's first frame on a connection.
type Welcome struct {
	SessionID           string `json:"session_id"`
	UserID              string `json:"user_id"`
	TenantID            string `json:"tenant_id"`
	HeartbeatIntervalMS int64  `json:"heartbeat_interval_ms"`
	HeartbeatTimeoutMS  int64  `json:"heartbeat_timeout_ms"`
	// TokenExpiresAt is the token's exp (Unix seconds): the server closes the connection then
	// (4011) unless the client refreshed its token (the Realtime client does, with its
	// TokenSource).
	TokenExpiresAt int64 `json:"token_expires_at"`
	// TokenExpiresInMS is the same, in milliseconds from when the welcome was sent.
	TokenExpiresInMS int64         `json:"token_expires_in_ms"`
	Limits           SessionLimits `json:"limits"`
}
