//! Parley's TypeScript SDK: `ParleyClient` (realtime, with `.rest`), `RestClient`, `CallSession`.
export { ParleyClient } from "./client.js";
export type {
  ClientEvents,
  OutboxRecord,
  OutboxStore,
  ParleyClientOptions,
  ResyncInfo,
  SendOptions,
  Subscription,
  SubscriptionLost,
} from "./client.js";
export { Connection } from "./connection.js";
export type { ConnectionState, ConnectionStateChange, WebSocketConstructor } from "./connection.js";
export { Endpoints } from "./endpoints.js";
export type { UrlOrder } from "./endpoints.js";
export { RestClient, MAX_HISTORY_LIMIT, MAX_CHANNEL_PAGE } from "./rest.js";
export type { ChannelListQuery, HistoryQuery, RestClientOptions, TokenSource } from "./rest.js";
export { ParleyError, isParleyError } from "./errors.js";
export type { ParleyErrorCode, SdkErrorCode } from "./errors.js";
export { CallSession, joinCall } from "./call.js";
export { SFU_PEER } from "./call.js";
export type { CallEvents, CallPeerInfo, CallState, JoinCallOptions, RemoteTrackInfo, VideoPreferences } from "./call.js";
export { SfuLink, SIMULCAST_ENCODINGS } from "./call_sfu.js";
export type { SfuBinding, SfuHost, SfuOptions } from "./call_sfu.js";
export { Backoff, parseRetryAfter } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { ChannelSequencer } from "./sequencer.js";
export type { DeliveredEvent, Gap } from "./sequencer.js";
export { Outbox, newClientMsgId } from "./outbox.js";
export type { OutboxEntry } from "./outbox.js";
export { Typing } from "./typing.js";
export type { TypingOptions } from "./typing.js";
export {
  CHANNEL_EVENT_TYPES,
  CLIENT_FRAME_FIELDS,
  CloseCode,
  SERVER_FRAME_TYPES,
  SUBPROTOCOL,
  isChannelEventType,
} from "./protocol.js";
export type { ClientFrame, ClientFrameType, ClientRequest, ResumeChannel } from "./protocol.js";
export * from "./negotiation.js";
export type * from "./types.js";
