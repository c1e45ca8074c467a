package parley

import (
	"encoding/json"
	"time"
)

// Event is anything a Realtime client delivers on Events(): a channel event (its concrete type
// embeds ChannelMeta), an ephemeral event (presence, typing, read positions, unread counts,
// call reconnects), or a Gap notice. Switch on the concrete type; unknown server events arrive
// as *UnknownEvent, so newer servers never break older clients.
type Event interface {
	// Type is the wire name of the event ("message.new", "typing", ...).
	Type() string
}

// ChannelMeta is what every persisted channel event carries.
type ChannelMeta struct {
	ChannelID string
	// Seq is the event's per-channel sequence number; a Realtime client delivers each seq of a
	// channel at most once, in increasing order.
	Seq uint64
	// FromHistory is set on an event read from storage (GET /v1/channels/{id}/events) to fill a
	// gap or a refused resume, rather than received live or replayed. A MessageNew read this way
	// carries the message's current state; its later edits in the gap are delivered too.
	FromHistory bool
}

// Channel returns the channel meta of a channel event (used to match any channel event).
func (m *ChannelMeta) Channel() *ChannelMeta { return m }

// ChannelEvent is implemented by every persisted channel event.
type ChannelEvent interface {
	Event
	Channel() *ChannelMeta
}

// MessageNew is a new message.
type MessageNew struct {
	ChannelMeta
	Message Message
}

// MessageUpdated is an edit.
type MessageUpdated struct {
	ChannelMeta
	Message Message
}

// MessageDeleted is a deletion; Message is the tombstone.
type MessageDeleted struct {
	ChannelMeta
	Message Message
}

// MemberAdded is a new member.
type MemberAdded struct {
	ChannelMeta
	Member Member
	By     string
}

// MemberUpdated is a role change; Member carries the new role.
type MemberUpdated struct {
	ChannelMeta
	Member Member
	By     string
}

// MemberRemoved is a removal; when UserID is the caller, the subscription has ended.
type MemberRemoved struct {
	ChannelMeta
	UserID string
	By     string
}

// ChannelUpdated is a rename.
type ChannelUpdated struct {
	ChannelMeta
	Info Channel
	By   string
}

// ChannelDeleted says the channel was deleted; nothing follows it.
type ChannelDeleted struct {
	ChannelMeta
	By string
}

// CallStarted is a new call in the channel.
type CallStarted struct {
	ChannelMeta
	Call CallInfo
}

// CallParticipantJoined is a participant joining a call.
type CallParticipantJoined struct {
	ChannelMeta
	CallID      string
	Participant CallParticipant
}

// CallParticipantLeft is a participant leaving a call; Reason is left, timeout, removed or ended.
type CallParticipantLeft struct {
	ChannelMeta
	CallID        string
	ParticipantID string
	UserID        string
	Reason        string
}

// CallEnded is the end of a call.
type CallEnded struct {
	ChannelMeta
	CallID string
	By     string
}

// UnknownChannelEvent is a persisted channel event of a type this SDK does not know.
type UnknownChannelEvent struct {
	ChannelMeta
	EventType string
	Raw       json.RawMessage
}

// Gap says that events of a channel in (From, To] could not be received live (a refused resume
// or a hole in live delivery) and are filled from the channel's stored events: every event of
// that range follows, in seq order, with FromHistory set (messages, edits, deletions, member
// changes, renames, call events).
type Gap struct {
	ChannelID string
	From, To  uint64
	// Reason is "resume_refused: <reason>", "live_gap" or "subscribe".
	Reason string
}

// ChannelAdded says the caller became a member of a channel: someone added them, or created a
// channel or DM with them in it. It reaches every connection of the user, subscribed or not;
// Subscribe to the channel to receive its events. Info.Role is the caller's role.
type ChannelAdded struct {
	Info Channel
	By   string
}

// PresenceChanged is a user's presence change.
type PresenceChanged struct {
	Presence
}

// Typing is someone starting or stopping typing.
type Typing struct {
	ChannelID string
	UserID    string
	State     TypingState
	// ExpiresIn is how long a start lasts without a refresh.
	ExpiresIn time.Duration
}

// ReadUpdated is a member's read position moving.
type ReadUpdated struct {
	ChannelID   string
	UserID      string
	LastReadSeq uint64
}

// UnreadUpdated is the caller's unread count of a channel changing.
type UnreadUpdated struct {
	ChannelID   string
	UnreadCount uint64
	LastReadSeq uint64
}

// CallParticipantReconnecting says a participant's connection dropped; it stays in the call
// for the reconnect grace period.
type CallParticipantReconnecting struct {
	CallID        string
	ParticipantID string
}

// CallParticipantReconnected says a participant came back after a drop.
type CallParticipantReconnected struct {
	CallID        string
	ParticipantID string
}

// UnknownEvent is a frame of a type this SDK does not know.
type UnknownEvent struct {
	EventType string
	Raw       json.RawMessage
}

func (*MessageNew) Type() string                  { return "message.new" }
func (*MessageUpdated) Type() string              { return "message.updated" }
func (*MessageDeleted) Type() string              { return "message.deleted" }
func (*MemberAdded) Type() string                 { return "member.added" }
func (*MemberRemoved) Type() string               { return "member.removed" }
func (*MemberUpdated) Type() string               { return "member.updated" }
func (*ChannelUpdated) Type() string              { return "channel.updated" }
func (*ChannelDeleted) Type() string              { return "channel.deleted" }
func (*CallStarted) Type() string                 { return "call.started" }
func (*CallParticipantJoined) Type() string       { return "call.participant_joined" }
func (*CallParticipantLeft) Type() string         { return "call.participant_left" }
func (*CallEnded) Type() string                   { return "call.ended" }
func (e *UnknownChannelEvent) Type() string       { return e.EventType }
func (*Gap) Type() string                         { return "gap" }
func (*PresenceChanged) Type() string             { return "presence.changed" }
func (*Typing) Type() string                      { return "typing" }
func (*ReadUpdated) Type() string                 { return "read.updated" }
func (*UnreadUpdated) Type() string               { return "unread.updated" }
func (*ChannelAdded) Type() string                { return "channel.added" }
func (*CallParticipantReconnecting) Type() string { return "call.participant_reconnecting" }
func (*CallParticipantReconnected) Type() string  { return "call.participant_reconnected" }
func (e *UnknownEvent) Type() string              { return e.EventType }

// frame is every server frame, decoded once: the union of the fields of all frame types.
type frame struct {
	Type string  `json:"type"`
	ID   *string `json:"id"`

	// presence.batch
	Presences []Presence `json:"presences"`

	// error
	Code         string          `json:"code"`
	Message      json.RawMessage `json:"-"`
	RetryAfterMS *int64          `json:"retry_after_ms"`

	// ack
	Seq         *uint64          `json:"seq"`
	Created     *bool            `json:"created"`
	Resumed     []resumedChannel `json:"resumed"`
	LastReadSeq *uint64          `json:"last_read_seq"`
	RolledBack  *bool            `json:"rolled_back"`
	TokenExpAt  *int64           `json:"token_expires_at"`
	TokenExpIn  *int64           `json:"token_expires_in_ms"`
	ChannelID   string           `json:"channel_id"`
	Member      *Member          `json:"member"`
	By          string           `json:"by"`
	UserID      string           `json:"user_id"`
	Channel     *Channel         `json:"channel"`
	Call        *CallInfo        `json:"call"`
	CallID      string           `json:"call_id"`
	Participant *CallParticipant `json:"participant"`
	PartID      string           `json:"participant_id"`
	Reason      string           `json:"reason"`
	Status      PresenceStatus   `json:"status"`
	LastSeen    *time.Time       `json:"last_seen"`
	LastActive  *time.Time       `json:"last_active"`
	State       TypingState      `json:"state"`
	ExpiresInMS *int64           `json:"expires_in_ms"`
	DelayMS     *int64           `json:"delay_ms"`
	UnreadCount *uint64          `json:"unread_count"`
	From        string           `json:"from"`
	To          string           `json:"to"`
	Role        NegotiationRole  `json:"role"`
	Signal      *signalPayload   `json:"signal"`

	// call.mode_changed, call.sfu, call.active_speaker
	Mode       CallMode `json:"mode"`
	SFUSession string   `json:"sfu_session"`
	Event      string   `json:"event"`
	TrackID    string   `json:"track_id"`
	Publisher  string   `json:"publisher"`
	Kind       string   `json:"kind"`
	Mid        string   `json:"mid"`
	Layers     []string `json:"layers"`
	Layer      *string  `json:"layer"`
	Audio      int      `json:"audio"`
	Video      int      `json:"video"`
	raw        json.RawMessage
}

// resumedChannel is one channel's outcome in a resume ack.
type resumedChannel struct {
	ChannelID string  `json:"channel_id"`
	Replayed  bool    `json:"replayed"`
	Events    uint64  `json:"events"`
	Seq       *uint64 `json:"seq"`
	Reason    string  `json:"reason"`
}

// signalPayload is what a call.signal carries.
type signalPayload struct {
	Kind       string `json:"kind"`
	SDP        string `json:"sdp,omitempty"`
	Candidate  string `json:"candidate,omitempty"`
	ICERestart bool   `json:"ice_restart,omitempty"`
	Credential string `json:"credential,omitempty"`
}

// decodeFrame parses a server frame. The "message" field is a string in error frames and an
// object elsewhere, so it is kept raw.
func decodeFrame(data []byte) (*frame, error) {
	var f frame
	type alias frame
	var wire struct {
		alias
		Message json.RawMessage `json:"message"`
	}
	if err := json.Unmarshal(data, &wire); err != nil {
		return nil, err
	}
	f = frame(wire.alias)
	f.Message = wire.Message
	f.raw = json.RawMessage(append([]byte(nil), data...))
	return &f, nil
}

// message decodes the frame's message object.
func (f *frame) message() (Message, bool) {
	var m Message
	if len(f.Message) == 0 || f.Message[0] != '{' {
		return m, false
	}
	return m, json.Unmarshal(f.Message, &m) == nil
}

// errorText is an error frame's message.
func (f *frame) errorText() string {
	var s string
	_ = json.Unmarshal(f.Message, &s)
	return s
}

// asError turns an error frame into an *Error.
func (f *frame) asError() *Error {
	e := &Error{Code: f.Code, Message: f.errorText(), Reason: f.Reason}
	if f.RetryAfterMS != nil {
		e.RetryAfter = time.Duration(*f.RetryAfterMS) * time.Millisecond
	}
	return e
}

// isChannelEvent reports whether the frame is a persisted channel event (it has a channel and
// a seq and is not a reply).
func (f *frame) isChannelEvent() bool {
	return f.Seq != nil && f.ChannelID != "" && f.Type != "ack" && f.Type != "error" &&
		f.Type != "unread.updated" && f.Type != "read.updated" && f.Type != "typing"
}

// channelEvent builds the typed event of a persisted channel event.
func (f *frame) channelEvent() ChannelEvent {
	meta := ChannelMeta{ChannelID: f.ChannelID, Seq: *f.Seq}
	switch f.Type {
	case "message.new", "message.updated", "message.deleted":
		m, ok := f.message()
		if !ok {
			break
		}
		switch f.Type {
		case "message.new":
			return &MessageNew{ChannelMeta: meta, Message: m}
		case "message.updated":
			return &MessageUpdated{ChannelMeta: meta, Message: m}
		default:
			return &MessageDeleted{ChannelMeta: meta, Message: m}
		}
	case "member.added":
		if f.Member != nil {
			return &MemberAdded{ChannelMeta: meta, Member: *f.Member, By: f.By}
		}
	case "member.updated":
		if f.Member != nil {
			return &MemberUpdated{ChannelMeta: meta, Member: *f.Member, By: f.By}
		}
	case "member.removed":
		return &MemberRemoved{ChannelMeta: meta, UserID: f.UserID, By: f.By}
	case "channel.updated":
		if f.Channel != nil {
			return &ChannelUpdated{ChannelMeta: meta, Info: *f.Channel, By: f.By}
		}
	case "channel.deleted":
		return &ChannelDeleted{ChannelMeta: meta, By: f.By}
	case "call.started":
		if f.Call != nil {
			return &CallStarted{ChannelMeta: meta, Call: *f.Call}
		}
	case "call.participant_joined":
		if f.Participant != nil {
			return &CallParticipantJoined{ChannelMeta: meta, CallID: f.CallID, Participant: *f.Participant}
		}
	case "call.participant_left":
		return &CallParticipantLeft{ChannelMeta: meta, CallID: f.CallID, ParticipantID: f.PartID, UserID: f.UserID, Reason: f.Reason}
	case "call.ended":
		return &CallEnded{ChannelMeta: meta, CallID: f.CallID, By: f.By}
	}
	return &UnknownChannelEvent{ChannelMeta: meta, EventType: f.Type, Raw: f.raw}
}

// ephemeralEvent builds the event of a frame that is not a channel event, a reply or a signal.
func (f *frame) ephemeralEvent() Event {
	switch f.Type {
	case "presence.changed":
		return &PresenceChanged{Presence{UserID: f.UserID, Status: f.Status, LastSeen: f.LastSeen, LastActive: f.LastActive}}
	case "typing":
		var exp time.Duration
		if f.ExpiresInMS != nil {
			exp = time.Duration(*f.ExpiresInMS) * time.Millisecond
		}
		return &Typing{ChannelID: f.ChannelID, UserID: f.UserID, State: f.State, ExpiresIn: exp}
	case "read.updated":
		return &ReadUpdated{ChannelID: f.ChannelID, UserID: f.UserID, LastReadSeq: deref(f.LastReadSeq)}
	case "unread.updated":
		return &UnreadUpdated{ChannelID: f.ChannelID, UnreadCount: deref(f.UnreadCount), LastReadSeq: deref(f.LastReadSeq)}
	case "channel.added":
		if f.Channel != nil {
			return &ChannelAdded{Info: *f.Channel, By: f.By}
		}
	case "call.participant_reconnecting":
		return &CallParticipantReconnecting{CallID: f.CallID, ParticipantID: f.PartID}
	case "call.participant_reconnected":
		return &CallParticipantReconnected{CallID: f.CallID, ParticipantID: f.PartID}
	}
	return &UnknownEvent{EventType: f.Type, Raw: f.raw}
}

func deref(p *uint64) uint64 {
	if p == nil {
		return 0
	}
	return *p
}
