//! The WebSocket protocol as the SDK speaks it: client frames (which the OpenAPI document does not
//! describe, so they are written here from docs/protocol.md), and the lists of frame and event
//! types the SDK knows. `test/unit/protocol_tables.test.ts` checks these lists against the tables
//! in docs/protocol.md, and the `satisfies` clauses below tie them to the generated types.
import type { ChannelEvent, ChannelEventType, ServerFrame, ServerFrameType, SignalPayload } from "./types.js";

/** The WebSocket subprotocol of API v1. */
export const SUBPROTOCOL = "parley.v1";

/** Every frame a client may send, by `type`. */
export type ClientFrame =
  | { type: "auth"; token: string; id?: string }
  | { type: "auth.refresh"; id: string; token: string }
  | { type: "subscribe"; id: string; channel_id: string }
  | { type: "unsubscribe"; id: string; channel_id: string }
  | {
      type: "message.send";
      id: string;
      channel_id: string;
      client_msg_id: string;
      text: string;
      metadata?: unknown;
    }
  | { type: "ping"; id: string }
  | { type: "resume"; id: string; session_id: string; channels: ResumeChannel[] }
  | { type: "typing.start"; id: string; channel_id: string }
  | { type: "typing.stop"; id: string; channel_id: string }
  | { type: "read"; id: string; channel_id: string; seq: number }
  | { type: "presence.set"; id: string; away: boolean }
  | { type: "call.attach"; id: string; call_id: string; participant_id: string }
  | {
      type: "call.signal";
      id: string;
      call_id: string;
      from: string;
      to: string;
      signal: SignalPayload;
    }
  | {
      type: "call.sfu";
      id: string;
      call_id: string;
      participant_id: string;
      op: "subscribe" | "unsubscribe" | "video";
      track_id: string;
      paused?: boolean;
      max_width?: number;
      max_height?: number;
    };

export type ClientFrameType = ClientFrame["type"];
/** A request frame without its `id` (the client assigns one). */
export type ClientRequest = ClientFrame extends infer F
  ? F extends { type: ClientFrameType }
    ? Omit<F, "id">
    : never
  : never;

/** One channel of a `resume` frame: the last seq the client has seen. */
export interface ResumeChannel {
  channel_id: string;
  seq: number;
}

/** The fields of each client frame (the `type` aside), as docs/protocol.md lists them. */
export const CLIENT_FRAME_FIELDS = {
  auth: ["token", "id?"],
  "auth.refresh": ["id", "token"],
  subscribe: ["id", "channel_id"],
  unsubscribe: ["id", "channel_id"],
  "message.send": ["id", "channel_id", "client_msg_id", "text", "metadata?"],
  ping: ["id"],
  resume: ["id", "session_id", "channels"],
  "typing.start": ["id", "channel_id"],
  "typing.stop": ["id", "channel_id"],
  read: ["id", "channel_id", "seq"],
  "presence.set": ["id", "away"],
  "call.attach": ["id", "call_id", "participant_id"],
  "call.signal": ["id", "call_id", "from", "to", "signal"],
  "call.sfu": ["id", "call_id", "participant_id", "op", "track_id", "paused?", "max_width?", "max_height?"],
} as const satisfies { [K in ClientFrameType]: readonly FieldsOf<Extract<ClientFrame, { type: K }>>[] };

type FieldsOf<F> = {
  [K in Exclude<keyof F, "type">]-?: undefined extends F[K] ? `${K & string}?` : K & string;
}[Exclude<keyof F, "type">];

/**
 * The fields of each server frame (the `type` aside), as the SDK's (generated) types have them.
 * Exact: `tsc` fails if a field is missing here or is not in the type.
 */
export const SERVER_FRAME_FIELDS = {
  welcome: [
    "session_id",
    "user_id",
    "tenant_id",
    "heartbeat_interval_ms",
    "heartbeat_timeout_ms",
    "token_expires_at",
    "token_expires_in_ms",
    "limits",
  ],
  ack: [
    "id",
    "channel_id?",
    "seq?",
    "message?",
    "created?",
    "resumed?",
    "last_read_seq?",
    "rolled_back?",
    "token_expires_at?",
    "token_expires_in_ms?",
  ],
  error: ["id?", "code", "message", "retry_after_ms?", "reason?"],
  pong: ["id"],
  "presence.changed": ["user_id", "status", "last_seen?", "last_active?"],
  "presence.batch": ["presences"],
  typing: ["channel_id", "user_id", "state", "expires_in_ms?"],
  "read.updated": ["channel_id", "user_id", "last_read_seq"],
  "unread.updated": ["channel_id", "unread_count", "last_read_seq"],
  "channel.added": ["channel", "by"],
  "call.signal": ["call_id", "from", "to", "role", "signal"],
  "call.participant_reconnecting": ["call_id", "participant_id"],
  "call.participant_reconnected": ["call_id", "participant_id"],
  "call.mode_changed": ["call_id", "mode", "sfu_session?", "reason"],
  "call.active_speaker": ["call_id", "participant_id?"],
  "call.sfu": ["call_id", "participant_id", "event"],
  reconnect: ["delay_ms", "reason"],
} as const satisfies { [K in ServerFrameType]: readonly FieldsOf<Extract<ServerFrame, { type: K }>>[] };

/** The payload fields of each channel event (`type`, `channel_id` and `seq` aside). Exact, like the above. */
export const CHANNEL_EVENT_FIELDS = {
  "message.new": ["message"],
  "message.updated": ["message"],
  "message.deleted": ["message"],
  "member.added": ["member", "by"],
  "member.removed": ["user_id", "by"],
  "member.updated": ["member", "by"],
  "channel.updated": ["channel", "by"],
  "channel.deleted": ["by"],
  "call.started": ["call"],
  "call.participant_joined": ["call_id", "participant"],
  "call.participant_left": ["call_id", "participant_id", "user_id", "reason"],
  "call.ended": ["call_id", "by"],
} as const satisfies {
  [K in ChannelEventType]: readonly Exclude<FieldsOf<Extract<ChannelEvent, { type: K }>>, "channel_id" | "seq">[];
};

/** Fields of `U`'s member of each listed type that the list leaves out (never when exact). */
type Unlisted<M extends { [k: string]: readonly string[] }, U extends { type: string }, Skip extends string = never> = {
  [K in keyof M]: Exclude<FieldsOf<Extract<U, { type: K }>>, M[K][number] | Skip>;
}[keyof M];
const _clientExact: Unlisted<typeof CLIENT_FRAME_FIELDS, ClientFrame> extends never ? true : false = true;
const _serverExact: Unlisted<typeof SERVER_FRAME_FIELDS, ServerFrame> extends never ? true : false = true;
const _eventsExact: Unlisted<typeof CHANNEL_EVENT_FIELDS, ChannelEvent, "channel_id" | "seq"> extends never
  ? true
  : false = true;
void _clientExact;
void _serverExact;
void _eventsExact;

/** Every channel event type the SDK knows (docs/protocol.md, "Channel events"). */
export const CHANNEL_EVENT_TYPES = [
  "message.new",
  "message.updated",
  "message.deleted",
  "member.added",
  "member.removed",
  "member.updated",
  "channel.updated",
  "channel.deleted",
  "call.started",
  "call.participant_joined",
  "call.participant_left",
  "call.ended",
] as const satisfies readonly ChannelEventType[];

/** Every server frame type other than channel events (docs/protocol.md, "Server → client"). */
export const SERVER_FRAME_TYPES = [
  "welcome",
  "ack",
  "error",
  "pong",
  "presence.changed",
  "presence.batch",
  "typing",
  "read.updated",
  "unread.updated",
  "channel.added",
  "call.signal",
  "call.participant_reconnecting",
  "call.participant_reconnected",
  "call.mode_changed",
  "call.active_speaker",
  "call.sfu",
  "reconnect",
] as const satisfies readonly ServerFrameType[];

// Compile-time exhaustiveness: a type the server declares but these lists miss fails `tsc`.
type Missing<All, Listed> = Exclude<All, Listed>;
const _allEvents: Missing<ChannelEventType, (typeof CHANNEL_EVENT_TYPES)[number]> extends never
  ? true
  : false = true;
const _allFrames: Missing<ServerFrameType, (typeof SERVER_FRAME_TYPES)[number]> extends never
  ? true
  : false = true;
void _allEvents;
void _allFrames;

const channelEventTypes: ReadonlySet<string> = new Set(CHANNEL_EVENT_TYPES);

/** Whether a frame `type` is a channel event (carries `channel_id` and `seq`). */
export function isChannelEventType(type: string): type is ChannelEventType {
  return channelEventTypes.has(type);
}

/** WebSocket close codes of docs/protocol.md. */
export const CloseCode = {
  ServerShuttingDown: 1001,
  InvalidUtf8: 1007,
  PolicyViolation: 1008,
  FrameTooLarge: 1009,
  AuthenticationFailed: 4001,
  AuthenticationTimeout: 4002,
  HeartbeatTimeout: 4003,
  RateLimitFlood: 4008,
  SlowConsumer: 4009,
  TokenExpired: 4011,
} as const;
