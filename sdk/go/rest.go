package parley

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strconv"
)

// ---- channels ----

// CreateChannelParams is the body of CreateChannel.
type CreateChannelParams struct {
	Kind ChannelKind `json:"kind"`
	// Name is required for a channel and forbidden for a DM (1–100 characters).
	Name string `json:"name,omitempty"`
	// Members are the other users to add. For a DM: exactly one, the other party.
	Members []string `json:"members,omitempty"`
}

// CreateChannel creates a channel, or returns the existing DM between the two users.
func (c *Client) CreateChannel(ctx context.Context, p CreateChannelParams) (*Channel, error) {
	var ch Channel
	return &ch, c.do(ctx, "POST", "/v1/channels", nil, p, &ch)
}

// ListChannels returns every channel of the caller, newest first, with their last seq, read
// position and unread count. It reads the list page by page (ListChannelsPage, the largest pages
// the server serves) until the last one.
func (c *Client) ListChannels(ctx context.Context) ([]Channel, error) {
	var all []Channel
	cursor := ""
	for {
		page, err := c.ListChannelsPage(ctx, ChannelsQuery{Limit: MaxChannelPage, Cursor: cursor})
		if err != nil {
			return all, err
		}
		all = append(all, page.Channels...)
		if page.NextCursor == "" {
			return all, nil
		}
		cursor = page.NextCursor
	}
}

// MaxChannelPage is the largest page of ListChannelsPage the server serves; its default is 100.
const MaxChannelPage = 200

// ChannelsQuery selects a page of ListChannelsPage.
type ChannelsQuery struct {
	// Limit is the page size, 1–200; 0 for the server's default (100).
	Limit int
	// Cursor is the NextCursor of the previous page; empty for the first page.
	Cursor string
}

// ChannelPage is one page of the caller's channels, newest first.
type ChannelPage struct {
	Channels []Channel `json:"channels"`
	// NextCursor continues the listing (pass it as ChannelsQuery.Cursor); empty on the last page.
	NextCursor string `json:"next_cursor"`
}

// ListChannelsPage returns one page of the caller's channels (GET /v1/channels?limit=&cursor=).
// A cursor the server did not hand out is ErrInvalidArgument.
func (c *Client) ListChannelsPage(ctx context.Context, q ChannelsQuery) (*ChannelPage, error) {
	if q.Limit < 0 || q.Limit > MaxChannelPage {
		return nil, &Error{Code: "invalid_argument", Message: fmt.Sprintf("limit must be 1–%d, got %d", MaxChannelPage, q.Limit)}
	}
	query := url.Values{}
	if q.Limit > 0 {
		query.Set("limit", strconv.Itoa(q.Limit))
	}
	if q.Cursor != "" {
		query.Set("cursor", q.Cursor)
	}
	var raw struct {
		Channels   []Channel `json:"channels"`
		NextCursor *string   `json:"next_cursor"`
	}
	if err := c.do(ctx, "GET", "/v1/channels", query, nil, &raw); err != nil {
		return nil, err
	}
	page := &ChannelPage{Channels: raw.Channels}
	if raw.NextCursor != nil {
		page.NextCursor = *raw.NextCursor
	}
	return page, nil
}

// Channel returns one channel.
func (c *Client) Channel(ctx context.Context, channelID string) (*Channel, error) {
	var ch Channel
	return &ch, c.do(ctx, "GET", "/v1/channels/"+pathEscape(channelID), nil, nil, &ch)
}

// RenameChannel renames a channel (moderators and owners).
func (c *Client) RenameChannel(ctx context.Context, channelID, name string) (*Channel, error) {
	var ch Channel
	body := map[string]string{"name": name}
	return &ch, c.do(ctx, "PATCH", "/v1/channels/"+pathEscape(channelID), nil, body, &ch)
}

// DeleteChannel deletes a channel (owners; either party of a DM).
func (c *Client) DeleteChannel(ctx context.Context, channelID string) error {
	return c.do(ctx, "DELETE", "/v1/channels/"+pathEscape(channelID), nil, nil, nil)
}

// ---- members ----

// Members lists the members of a channel with their read positions.
func (c *Client) Members(ctx context.Context, channelID string) ([]Member, error) {
	var out struct {
		Members []Member `json:"members"`
	}
	return out.Members, c.do(ctx, "GET", "/v1/channels/"+pathEscape(channelID)+"/members", nil, nil, &out)
}

// AddMember adds a user to a channel. An empty role means member.
func (c *Client) AddMember(ctx context.Context, channelID, userID string, role MemberRole) (*Member, error) {
	body := map[string]any{"user_id": userID}
	if role != "" {
		body["role"] = role
	}
	var m Member
	return &m, c.do(ctx, "POST", "/v1/channels/"+pathEscape(channelID)+"/members", nil, body, &m)
}

// UpdateMemberRole changes a member's role and returns the member as they now are. Only an owner
// changes another member's role; anyone may lower their own. Demoting the channel's only owner
// is refused (Code "conflict"). Subscribers receive *MemberUpdated.
func (c *Client) UpdateMemberRole(ctx context.Context, channelID, userID string, role MemberRole) (*Member, error) {
	var m Member
	path := "/v1/channels/" + pathEscape(channelID) + "/members/" + pathEscape(userID)
	return &m, c.do(ctx, "PATCH", path, nil, map[string]any{"role": role}, &m)
}

// RemoveMember removes a user from a channel (or, for the caller's own id, leaves it).
func (c *Client) RemoveMember(ctx context.Context, channelID, userID string) error {
	return c.do(ctx, "DELETE", "/v1/channels/"+pathEscape(channelID)+"/members/"+pathEscape(userID), nil, nil, nil)
}

// ---- messages ----

// SendParams is the body of a send.
type SendParams struct {
	// ClientMsgID is the idempotency key (1–64 characters); NewClientMsgID makes one. A retry
	// with the same key returns the original message.
	ClientMsgID string          `json:"client_msg_id"`
	Text        string          `json:"text"`
	Metadata    json.RawMessage `json:"metadata,omitempty"`
}

// SendMessage sends a message over REST. With an empty ClientMsgID one is generated; retrying
// with the same ClientMsgID is safe (Created is false on the retry).
func (c *Client) SendMessage(ctx context.Context, channelID string, p SendParams) (*SendResult, error) {
	if p.ClientMsgID == "" {
		p.ClientMsgID = NewClientMsgID()
	}
	var r SendResult
	return &r, c.do(ctx, "POST", "/v1/channels/"+pathEscape(channelID)+"/messages", nil, p, &r)
}

// EditMessage replaces a message's text (and metadata, when not nil).
func (c *Client) EditMessage(ctx context.Context, channelID, messageID, text string, metadata json.RawMessage) (*Message, error) {
	body := map[string]any{"text": text}
	if metadata != nil {
		body["metadata"] = metadata
	}
	var m Message
	return &m, c.do(ctx, "PATCH", "/v1/channels/"+pathEscape(channelID)+"/messages/"+pathEscape(messageID), nil, body, &m)
}

// DeleteMessage deletes a message; it stays in history as a tombstone, which is returned.
func (c *Client) DeleteMessage(ctx context.Context, channelID, messageID string) (*Message, error) {
	var m Message
	return &m, c.do(ctx, "DELETE", "/v1/channels/"+pathEscape(channelID)+"/messages/"+pathEscape(messageID), nil, nil, &m)
}

// HistoryQuery selects a page of history. At most one of Before, After and Around may be set;
// none means the newest page.
type HistoryQuery struct {
	Before, After, Around uint64
	// FromStart asks for the oldest page (after=0), since a zero After means "not set".
	FromStart bool
	// Limit is the page size, 1–200 (0: the server's default, 50).
	Limit int
}

// History returns one page of a channel's messages, ascending by seq.
func (c *Client) History(ctx context.Context, channelID string, q HistoryQuery) (*MessagePage, error) {
	v := url.Values{}
	if q.Before != 0 {
		v.Set("before", strconv.FormatUint(q.Before, 10))
	}
	if q.After != 0 || q.FromStart {
		v.Set("after", strconv.FormatUint(q.After, 10))
	}
	if q.Around != 0 {
		v.Set("around", strconv.FormatUint(q.Around, 10))
	}
	if q.Limit != 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	var p MessagePage
	return &p, c.do(ctx, "GET", "/v1/channels/"+pathEscape(channelID)+"/messages", v, nil, &p)
}

// EventPage is a page of a channel's persisted events.
type EventPage struct {
	// Events are ascending by seq, typed as the Realtime client delivers them (*MessageNew,
	// *MessageUpdated, *MemberAdded, ...; *UnknownChannelEvent for a type this SDK does not
	// know).
	Events []ChannelEvent
	// HasMore says that events after the last one exist: ask again from its seq.
	HasMore bool
}

// Events returns the channel's persisted events with a seq greater than after, ascending, at
// most limit of them (1–200; 0: the server's default, 100): messages, edits, deletions,
// membership changes, renames and call events, each typed as its live event. A Realtime client
// fills its gaps with it; call it yourself to catch up from a seq you stored.
func (c *Client) Events(ctx context.Context, channelID string, after uint64, limit int) (*EventPage, error) {
	v := url.Values{}
	v.Set("after", strconv.FormatUint(after, 10))
	if limit != 0 {
		v.Set("limit", strconv.Itoa(limit))
	}
	var wire struct {
		Events  []json.RawMessage `json:"events"`
		HasMore bool              `json:"has_more"`
	}
	if err := c.do(ctx, "GET", "/v1/channels/"+pathEscape(channelID)+"/events", v, nil, &wire); err != nil {
		return nil, err
	}
	page := &EventPage{HasMore: wire.HasMore, Events: make([]ChannelEvent, 0, len(wire.Events))}
	for _, raw := range wire.Events {
		f, err := decodeFrame(raw)
		if err != nil || !f.isChannelEvent() {
			return nil, fmt.Errorf("parley: the events page holds something that is not a channel event: %s", raw)
		}
		page.Events = append(page.Events, f.channelEvent())
	}
	return page, nil
}

// ---- read state, typing, presence ----

// ReadState returns the caller's read position and unread count in a channel.
func (c *Client) ReadState(ctx context.Context, channelID string) (*ReadState, error) {
	var r ReadState
	return &r, c.do(ctx, "GET", "/v1/channels/"+pathEscape(channelID)+"/read", nil, nil, &r)
}

// MarkRead moves the caller's read position forward to seq (an older seq changes nothing).
func (c *Client) MarkRead(ctx context.Context, channelID string, seq uint64) (*ReadState, error) {
	var r ReadState
	body := map[string]uint64{"seq": seq}
	return &r, c.do(ctx, "PUT", "/v1/channels/"+pathEscape(channelID)+"/read", nil, body, &r)
}

// Typing announces that the caller started or stopped typing in a channel.
func (c *Client) Typing(ctx context.Context, channelID string, state TypingState) error {
	body := map[string]TypingState{"state": state}
	return c.do(ctx, "POST", "/v1/channels/"+pathEscape(channelID)+"/typing", nil, body, nil)
}

// Presence returns a user's presence (only users sharing a channel with the caller).
func (c *Client) Presence(ctx context.Context, userID string) (*Presence, error) {
	var p Presence
	return &p, c.do(ctx, "GET", "/v1/users/"+pathEscape(userID)+"/presence", nil, nil, &p)
}

// PresenceOf returns the presence of up to 200 users at once; users who share no channel with
// the caller are left out.
func (c *Client) PresenceOf(ctx context.Context, userIDs []string) ([]Presence, error) {
	var out struct {
		Presence []Presence `json:"presence"`
	}
	body := map[string][]string{"user_ids": userIDs}
	return out.Presence, c.do(ctx, "POST", "/v1/presence/query", nil, body, &out)
}

// ---- calls ----

// StartCall starts the channel's call, or returns the active one.
func (c *Client) StartCall(ctx context.Context, channelID string) (*CallInfo, error) {
	var call CallInfo
	return &call, c.do(ctx, "POST", "/v1/channels/"+pathEscape(channelID)+"/calls", nil, nil, &call)
}

// Calls lists a channel's calls, newest first.
func (c *Client) Calls(ctx context.Context, channelID string) ([]CallInfo, error) {
	var out struct {
		Calls []CallInfo `json:"calls"`
	}
	return out.Calls, c.do(ctx, "GET", "/v1/channels/"+pathEscape(channelID)+"/calls", nil, nil, &out)
}

// GetCall returns one call with its participants.
func (c *Client) GetCall(ctx context.Context, callID string) (*CallInfo, error) {
	var call CallInfo
	return &call, c.do(ctx, "GET", "/v1/calls/"+pathEscape(callID), nil, nil, &call)
}

// JoinCallREST joins an active call: the new participant id, the peers already present with the
// caller's negotiation role towards each, and the ICE servers. Joining twice is idempotent.
// Most programs use Realtime.JoinCall, which also runs the WebRTC side.
func (c *Client) JoinCallREST(ctx context.Context, callID string) (*JoinedCall, error) {
	var j JoinedCall
	return &j, c.do(ctx, "POST", "/v1/calls/"+pathEscape(callID)+"/join", nil, nil, &j)
}

// LeaveCall makes a participant leave a call; the call ends when its last participant leaves.
func (c *Client) LeaveCall(ctx context.Context, callID, participantID string) error {
	body := map[string]string{"participant_id": participantID}
	return c.do(ctx, "POST", "/v1/calls/"+pathEscape(callID)+"/leave", nil, body, nil)
}

// EndCall ends a call for everyone (owners and moderators; either party of a DM).
func (c *Client) EndCall(ctx context.Context, callID string) error {
	return c.do(ctx, "POST", "/v1/calls/"+pathEscape(callID)+"/end", nil, nil, nil)
}
