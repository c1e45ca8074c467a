//! Friendly names for the wire types. Everything here derives from `generated/openapi.ts` (the
//! server's OpenAPI document); the only hand-made corrections are marked and explained.
import type { components } from "./generated/openapi.js";

type Schemas = components["schemas"];

/** A stable error code of the server (docs/protocol.md, "Error codes"). */
export type ErrorCode = Schemas["ErrorCode"];
export type ChannelKind = Schemas["ChannelKind"];
export type PresenceStatus = Schemas["PresenceStatus"];
export type TypingState = Schemas["TypingState"];
export type CallMode = Schemas["CallMode"];
export type LeaveReason = Schemas["LeaveReason"];
export type ResumeRefusal = Schemas["ResumeRefusal"];
export type SignalKind = Schemas["SignalKind"];
/** A call signal; `credential` goes in the first offer of a connection to the SFU (docs/calls.md). */
export type SignalPayload = Schemas["SignalPayload"];
export type SessionLimits = Schemas["SessionLimits"];
export type IceServer = Schemas["IceServer"];

/** A participant's role in perfect negotiation with one peer. */
export type NegotiationRole = Schemas["NegotiationRole"];
/** A member's role in a channel. */
export type MemberRole = Schemas["Role"];

export type Message = Schemas["Message"];
export type MessagePage = Schemas["MessagePage"];
/** `GET /v1/channels/{id}/events`: persisted events after a seq. */
export type EventPage = Schemas["EventPage"];
export type SendResult = Schemas["SendResult"];
export type Channel = Schemas["Channel"];
/** A page of `GET /v1/channels`: `next_cursor` continues it, `null` on the last page. */
export type ChannelList = Schemas["ChannelList"];
export type Member = Schemas["Member"];
export type MemberList = { members: Member[] };
export type ReadState = Schemas["ReadState"];
export type Presence = Schemas["Presence"];
export type PresenceList = Schemas["PresenceList"];
export type Call = Schemas["Call"];
export type CallList = Schemas["CallList"];
export type CallParticipant = Schemas["CallParticipant"];
/** The SFU block of a join answer in `sfu` mode: the credential for the SFU connection. */
export type SfuJoin = Schemas["SfuAccess"];
/** The join answer; `sfu` is there when the call is in `sfu` mode. */
export type JoinedCall = Schemas["JoinedCall"];
export type Peer = Schemas["Peer"];
export type ErrorBody = Schemas["ErrorBody"];
export type DevToken = Schemas["DevToken"];
export type DevTokenRequest = Schemas["DevTokenRequest"];

export type CreateChannelRequest = Schemas["CreateChannel"];
export type AddMemberRequest = Schemas["AddMember"];
export type UpdateMemberRequest = Schemas["UpdateMember"];
export type SendMessageRequest = Schemas["SendMessage"];
export type EditMessageRequest = Schemas["EditMessage"];
export type PatchChannelRequest = Schemas["PatchChannel"];

/** What happened in a channel, by `type` (docs/protocol.md, "Channel events"). */
export type EventBody = Schemas["EventBody"];
/** A persisted channel event: `channel_id`, `seq` and a body. */
export type ChannelEvent = EventBody & { channel_id: string; seq: number };
export type ChannelEventType = ChannelEvent["type"];
/** The channel event of one `type`. */
export type ChannelEventOf<T extends ChannelEventType> = Extract<ChannelEvent, { type: T }>;

/** Why a call's mode changed. */
export type ModeChangeReason = Schemas["ModeChangeReason"];
/** The `event` of a `call.sfu` notice from the server, with its fields (docs/calls.md, "SFU notices"). */
export type SfuNotice = Schemas["SfuNotice"];

/** A frame from the server other than a channel event. */
export type ServerFrame = Schemas["ServerFrame"];
export type ServerFrameType = ServerFrame["type"];
export type ServerFrameOf<T extends ServerFrameType> = Extract<ServerFrame, { type: T }>;
export type WelcomeFrame = ServerFrameOf<"welcome">;
export type AckFrame = ServerFrameOf<"ack">;
export type ErrorFrame = ServerFrameOf<"error">;
export type ResumedChannel = Schemas["ResumedChannel"];
export type TypingEvent = ServerFrameOf<"typing">;
export type PresenceChangedEvent = ServerFrameOf<"presence.changed">;
export type PresenceBatchFrame = ServerFrameOf<"presence.batch">;
export type ReadUpdatedEvent = ServerFrameOf<"read.updated">;
export type UnreadUpdatedEvent = ServerFrameOf<"unread.updated">;
/** You became a member of a channel (added, or in a channel or DM someone created); `channel.role` is yours. */
export type ChannelAddedEvent = ServerFrameOf<"channel.added">;
export type CallSignalEvent = ServerFrameOf<"call.signal">;
export type CallParticipantReconnectingEvent = ServerFrameOf<"call.participant_reconnecting">;
export type CallParticipantReconnectedEvent = ServerFrameOf<"call.participant_reconnected">;
export type CallModeChangedEvent = ServerFrameOf<"call.mode_changed">;
export type CallActiveSpeakerEvent = ServerFrameOf<"call.active_speaker">;
export type CallSfuEvent = ServerFrameOf<"call.sfu">;
