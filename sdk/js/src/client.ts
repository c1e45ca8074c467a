//! `ParleyClient`: the realtime client. It owns one WebSocket at a time, reconnects on its own,
//! resumes every subscription with its last seq, fills holes from the channel's stored events,
//! delivers each channel's events exactly once in seq order, and sends messages through an outbox
//! that survives reconnects. It never lets an event through twice and never skips one silently:
//! every filled hole is reported as a `resync`.
import type { BackoffOptions } from "./backoff.js";
import { joinCall, type CallSession, type JoinCallOptions } from "./call.js";
import { Connection, type WebSocketConstructor } from "./connection.js";
import { Emitter } from "./emitter.js";
import { Endpoints, type UrlOrder } from "./endpoints.js";
import { ParleyError } from "./errors.js";
import { newClientMsgId, Outbox, type OutboxEntry } from "./outbox.js";
import { isChannelEventType, type ClientRequest } from "./protocol.js";
import { MAX_HISTORY_LIMIT, RestClient, type HistoryQuery, type TokenSource } from "./rest.js";
import { ChannelSequencer, type DeliveredEvent, type Gap } from "./sequencer.js";
import { Transport } from "./transport.js";
import { Typing, type TypingOptions } from "./typing.js";
import type {
  AckFrame,
  CallActiveSpeakerEvent,
  CallModeChangedEvent,
  CallParticipantReconnectedEvent,
  CallSfuEvent,
  CallParticipantReconnectingEvent,
  CallSignalEvent,
  ChannelAddedEvent,
  ChannelEvent,
  ChannelEventType,
  EventPage,
  Message,
  MessagePage,
  Presence,
  PresenceBatchFrame,
  PresenceChangedEvent,
  ReadUpdatedEvent,
  ResumedChannel,
  SendResult,
  TypingEvent,
  UnreadUpdatedEvent,
} from "./types.js";

export interface ParleyClientOptions {
  /**
   * The server's base URL, e.g. `http://127.0.0.1:8080` (the WebSocket is `/v1/ws` under it), or
   * several addresses of the same deployment (its edges, say). The client uses one at a time for
   * the WebSocket and REST; when its connection drops or cannot be made, the next attempt goes to
   * the next address (after the usual backoff), and the resume is exact on any of them. See
   * docs/failover.md.
   */
  url: string | readonly string[];
  /**
   * With several addresses: `random` (default) shuffles them once per client, spreading clients
   * over the deployment; `listed` keeps the given order (a primary, then fallbacks).
   */
  urlOrder?: UrlOrder;
  /** A token, or a function returning a fresh one (called for every connection and REST call). */
  token: TokenSource;
  /** WebSocket constructor. Default `globalThis.WebSocket`; in Node 20 pass `WebSocket` from `ws`. */
  WebSocket?: WebSocketConstructor;
  /** `fetch` for the REST client. Default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Reconnect delays. Default: 500 ms doubling to 30 s, half of it random. */
  backoff?: BackoffOptions;
  /** Timeout of each WebSocket request and of the welcome after connecting. Default 10 s. */
  requestTimeoutMs?: number;
  /** Typing helper options. */
  typing?: TypingOptions;
  /**
   * Stop retrying an outbox message after this many sends failed with `unavailable` or
   * `internal`. Default 8. (Lost connections and rate limits never count: those always retry.)
   */
  maxSendAttempts?: number;
  /**
   * Where the outbox is kept between runs (e.g. `localStorage` in a browser), so messages sent
   * offline survive a reload. `load` is read once by the constructor (restored messages are sent
   * once connected, reported by `outbox.sent` / `outbox.failed`); `save` gets every change. Without
   * it the outbox lives in memory.
   */
  outboxStore?: OutboxStore;
}

/** A message of the outbox, as an `OutboxStore` keeps it. */
export interface OutboxRecord {
  clientMsgId: string;
  channelId: string;
  text: string;
  metadata?: unknown;
}

/** Keeps the outbox between runs. */
export interface OutboxStore {
  load(): OutboxRecord[];
  save(records: OutboxRecord[]): void;
}

/** A subscribed channel's position. */
export interface Subscription {
  channelId: string;
  /** Highest seq delivered to you. */
  seq: number;
}

/** A hole in a channel that was filled from its stored events (`GET …/events`). */
export interface ResyncInfo {
  channelId: string;
  after: number;
  through: number;
  /** Events delivered from storage (each with `fromHistory: true`), edits and membership included. */
  recovered: number;
  /**
   * Seqs of the hole that storage did not return. The server persists every channel event, so
   * this stays 0; should it not, refetch channel state (members, the visible messages).
   */
  unrecoverable: number;
}

export interface SubscriptionLost {
  channelId: string;
  reason: "removed" | "channel_deleted" | "not_a_member";
}

/** Events of `ParleyClient`, by name. */
export type ClientEvents = {
  /** Every channel event, in seq order per channel, exactly once. */
  event: DeliveredEvent;
} & { [K in ChannelEventType]: Extract<DeliveredEvent, { type: K }> } & {
  typing: TypingEvent;
  /** The set of users typing in a channel changed (see `client.typing.users`). */
  "typing.users": { channelId: string; users: string[] };
  "presence.changed": PresenceChangedEvent;
  "read.updated": ReadUpdatedEvent;
  "unread.updated": UnreadUpdatedEvent;
  /** You became a member of a channel; subscribe to it to receive its events. */
  "channel.added": ChannelAddedEvent;
  "call.signal": CallSignalEvent;
  "call.participant_reconnecting": CallParticipantReconnectingEvent;
  "call.participant_reconnected": CallParticipantReconnectedEvent;
  /** A call moved to the SFU (or to another SFU); a joined `CallSession` follows on its own. */
  "call.mode_changed": CallModeChangedEvent;
  /** The active speaker of a call through the SFU. */
  "call.active_speaker": CallActiveSpeakerEvent;
  /** An SFU notice for one of your participants (bindings, renegotiation; `CallSession` handles them). */
  "call.sfu": CallSfuEvent;
  resync: ResyncInfo;
  "subscription.lost": SubscriptionLost;
  /** A message of the outbox was acknowledged (also those restored from an `OutboxStore`). */
  "outbox.sent": { clientMsgId: string; result: SendResult };
  /** A message of the outbox was refused for good and dropped from it. */
  "outbox.failed": { clientMsgId: string; error: ParleyError };
  /** Errors not tied to one of your requests (an `error` frame without `id`, a failed history fill). */
  error: ParleyError;
};

export interface SendOptions {
  /** Idempotency key; generated when absent. Reusing one with another text is `idempotency_conflict`. */
  clientMsgId?: string;
  metadata?: unknown;
}

interface Sub {
  sequencer: ChannelSequencer;
  /** The subscribe (or resume) of the current connection has been acknowledged. */
  live: boolean;
  filling: boolean;
  waiters: Array<{ resolve: (s: Subscription) => void; reject: (e: ParleyError) => void }>;
}

interface SendWaiter {
  resolve: (result: SendResult) => void;
  reject: (e: ParleyError) => void;
}

export class ParleyClient extends Emitter<ClientEvents> {
  /** The REST client, with the same token. */
  readonly rest: RestClient;
  /** Connection state and its events. */
  readonly connection = new Connection();
  /** Typing indicators: `keystroke`, `stop`, `users`. */
  readonly typing: Typing;

  readonly #transport: Transport;
  readonly #maxSendAttempts: number;
  readonly #outboxStore: OutboxStore | undefined;
  #connectWaiters: Array<{ resolve: () => void; reject: (e: ParleyError) => void }> = [];
  /** Why the client stopped for good (a refused static token), until the next `connect()`. */
  #ended: ParleyError | undefined;

  readonly #subs = new Map<string, Sub>();
  readonly #outbox = new Outbox();
  readonly #sendWaiters = new Map<string, SendWaiter>();
  #outboxTimer: ReturnType<typeof setTimeout> | undefined;
  /** Read positions to (re)send, per channel. */
  readonly #reads = new Map<
    string,
    { seq: number; sent: boolean; waiters: Array<{ resolve: (seq: number) => void; reject: (e: ParleyError) => void }> }
  >();
  #away = false;
  readonly #unread = new Map<string, { unreadCount: number; lastReadSeq: number }>();
  readonly #presence = new Map<string, Presence>();

  constructor(options: ParleyClientOptions) {
    super();
    const endpoints = new Endpoints(options.url, options.urlOrder);
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) {
      throw new TypeError(
        "parley: no WebSocket constructor; in Node 20 pass `WebSocket` from the `ws` package as the `WebSocket` option",
      );
    }
    this.#transport = new Transport({
      endpoints,
      token: options.token,
      WebSocket: WS,
      backoff: options.backoff,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      connection: this.connection,
      hooks: {
        restore: (welcome, previous) => this.#restore(previous, welcome.limits.max_resume_channels),
        frame: (frame) => this.#onFrame(frame),
        error: (error) => this.emit("error", error),
        dropped: () => this.#onDropped(),
        fatal: (error) => {
          // Nothing will be sent on this token again: everything waiting fails with the reason.
          this.#ended = error;
          this.#failPending(error);
        },
      },
    });
    this.connection.on("connected", () => {
      // Subscriptions are back: read positions and queued messages go out now.
      for (const channelId of this.#reads.keys()) this.#sendRead(channelId);
      this.#pumpOutbox();
      for (const w of this.#connectWaiters.splice(0)) w.resolve();
    });
    this.#maxSendAttempts = options.maxSendAttempts ?? 8;
    this.#outboxStore = options.outboxStore;
    for (const record of options.outboxStore?.load() ?? []) {
      if (!this.#outbox.has(record.clientMsgId)) this.#outbox.add(record);
    }
    this.rest = new RestClient({
      baseUrl: endpoints,
      token: options.token,
      ...(options.fetch ? { fetch: options.fetch } : {}),
    });
    this.typing = new Typing(
      {
        send: (channelId, state) => {
          if (!this.#transport.ready) return;
          this.request({ type: state === "start" ? "typing.start" : "typing.stop", channel_id: channelId }).catch(() => {});
        },
        throttleMs: () => this.connection.welcome?.limits.typing_throttle_ms ?? 3_000,
        now: () => Date.now(),
      },
      options.typing,
      (channelId) => this.emit("typing.users", { channelId, users: this.typing.users(channelId) }),
    );
  }

  // ---- lifecycle ----

  /**
   * Connects (and keeps reconnecting until `close()`). Resolves once `connected`; rejects if the
   * connection fails for good (a refused static token) or `close()` is called first.
   */
  connect(): Promise<void> {
    this.#ended = undefined;
    const promise = new Promise<void>((resolve, reject) => this.#connectWaiters.push({ resolve, reject }));
    if (this.connection.state === "connected") {
      for (const w of this.#connectWaiters.splice(0)) w.resolve();
    }
    this.#transport.start();
    return promise;
  }

  /**
   * Closes the connection for good: pending sends and requests fail with `closed` (an
   * `outboxStore` keeps the unsent messages for the next client).
   */
  close(): void {
    this.#transport.stop("closed by the application");
    this.#ended = new ParleyError({ code: "closed", message: "the client was closed" });
    this.#failPending(this.#ended);
    this.typing._dispose();
  }

  /**
   * Fails every waiting send, subscription, read and `connect()` with `error`. The messages
   * leave the outbox in memory but not its `outboxStore`, which keeps them for the next client.
   */
  #failPending(error: ParleyError): void {
    clearTimeout(this.#outboxTimer);
    for (const entry of this.#outbox.pending()) {
      this.#outbox.remove(entry.clientMsgId);
      this.#sendWaiters.get(entry.clientMsgId)?.reject(error);
      this.#sendWaiters.delete(entry.clientMsgId);
    }
    for (const sub of this.#subs.values()) for (const w of sub.waiters.splice(0)) w.reject(error);
    for (const read of this.#reads.values()) for (const w of read.waiters.splice(0)) w.reject(error);
    for (const w of this.#connectWaiters.splice(0)) w.reject(error);
  }

  /**
   * Cuts the current connection as if the network had dropped it (the client reconnects and
   * resumes). For tests and for "reconnect now" buttons.
   */
  reconnectNow(): void {
    this.#transport.reconnectNow();
  }

  // ---- channels ----

  /**
   * Subscribes to a channel's events; the subscription is kept across reconnects. With `after`,
   * events after that seq are delivered (older ones up to the live point come from history);
   * without it, delivery starts at the live point, whose seq the promise returns (fetch what came
   * before from history).
   */
  subscribe(channelId: string, options: { after?: number } = {}): Promise<Subscription> {
    let sub = this.#subs.get(channelId);
    if (sub && sub.live && sub.sequencer.delivered !== undefined) {
      return Promise.resolve({ channelId, seq: sub.sequencer.delivered });
    }
    const promise = new Promise<Subscription>((resolve, reject) => {
      if (!sub) {
        sub = { sequencer: new ChannelSequencer(channelId, options.after), live: false, filling: false, waiters: [] };
        this.#subs.set(channelId, sub);
        if (this.#transport.ready) this.#subscribeOnServer(channelId, sub).catch(() => {});
      }
      sub.waiters.push({ resolve, reject });
    });
    return promise;
  }

  /** Stops a subscription. */
  async unsubscribe(channelId: string): Promise<void> {
    const sub = this.#subs.get(channelId);
    if (!sub) return;
    this.#subs.delete(channelId);
    for (const w of sub.waiters.splice(0)) {
      w.reject(new ParleyError({ code: "closed", message: `unsubscribed from ${channelId}` }));
    }
    if (this.#transport.ready) await this.request({ type: "unsubscribe", channel_id: channelId }).catch(() => {});
  }

  /** Whether the client holds a subscription to the channel (live, or being restored). */
  isSubscribed(channelId: string): boolean {
    return this.#subs.has(channelId);
  }

  /** Subscribed channels and the last seq delivered in each. */
  subscriptions(): Subscription[] {
    const out: Subscription[] = [];
    for (const [channelId, sub] of this.#subs) {
      if (sub.sequencer.delivered !== undefined) out.push({ channelId, seq: sub.sequencer.delivered });
    }
    return out;
  }

  // ---- messages ----

  /**
   * Sends a message. It goes into the outbox at once and is sent when connected, one at a time
   * per channel in call order, resent after a reconnect with the same `client_msg_id` (so it is
   * stored once), and resolves with the server's message. Fails for good on a refusal (e.g.
   * `idempotency_conflict`, `invalid_argument`, `not_a_member`), on `close()`, and when the
   * server refuses a static token (with that error; also every send after it, until `connect()`).
   */
  send(channelId: string, text: string, options: SendOptions = {}): Promise<SendResult> {
    if (this.#ended) return Promise.reject(this.#ended);
    const clientMsgId = options.clientMsgId ?? newClientMsgId();
    if (this.#outbox.has(clientMsgId)) {
      return Promise.reject(
        new ParleyError({ code: "invalid_argument", message: `client_msg_id ${clientMsgId} is already being sent` }),
      );
    }
    const promise = new Promise<SendResult>((resolve, reject) => {
      this.#sendWaiters.set(clientMsgId, { resolve, reject });
    });
    this.#outbox.add({
      clientMsgId,
      channelId,
      text,
      ...(options.metadata === undefined ? {} : { metadata: options.metadata }),
    });
    this.#saveOutbox();
    this.typing.reset(channelId);
    this.#pumpOutbox();
    return promise;
  }

  /** Messages sent but not acknowledged yet, oldest first per channel (e.g. to show as pending). */
  pendingMessages(): ReadonlyArray<Readonly<OutboxEntry>> {
    return this.#outbox.pending();
  }

  /** A page of history (see `RestClient.history`). */
  history(channelId: string, query: HistoryQuery = {}): Promise<MessagePage> {
    return this.rest.history(channelId, query);
  }

  /**
   * Pages backwards through a channel's history from `before` (default: the newest message),
   * newest page first, each page ascending.
   */
  async *historyPages(
    channelId: string,
    options: { before?: number; limit?: number } = {},
  ): AsyncGenerator<Message[], void, void> {
    const limit = options.limit ?? 50;
    let before = options.before;
    for (;;) {
      const page = await this.rest.history(channelId, before === undefined ? { limit } : { before, limit });
      if (page.messages.length > 0) yield page.messages;
      const first = page.messages[0];
      if (!page.has_before || !first) return;
      before = first.seq;
    }
  }

  // ---- read state, presence ----

  /**
   * Marks a channel read up to `seq` (only moves forward). Sent now when connected, otherwise on
   * the next connection; resolves with the server's `last_read_seq` once sent.
   */
  markRead(channelId: string, seq: number): Promise<number> {
    const current = this.#reads.get(channelId);
    if (current && current.seq >= seq && current.sent) return Promise.resolve(current.seq);
    const entry = { seq: Math.max(seq, current?.seq ?? 0), sent: false, waiters: current?.waiters ?? [] };
    this.#reads.set(channelId, entry);
    const promise = new Promise<number>((resolve, reject) => entry.waiters.push({ resolve, reject }));
    if (this.#transport.ready) this.#sendRead(channelId);
    return promise;
  }

  #sendRead(channelId: string): void {
    const entry = this.#reads.get(channelId);
    if (!entry || entry.sent) return;
    const seq = entry.seq;
    this.request({ type: "read", channel_id: channelId, seq }).then(
      (ack) => {
        const now = this.#reads.get(channelId);
        if (!now || now.seq > seq) return; // a newer position is on its way
        now.sent = true;
        for (const w of now.waiters.splice(0)) w.resolve(ack.last_read_seq ?? seq);
      },
      (e: unknown) => {
        if (e instanceof ParleyError && (e.code === "disconnected" || e.code === "timeout")) return; // resent on reconnect
        const now = this.#reads.get(channelId);
        if (now === entry) this.#reads.delete(channelId);
        const error = e instanceof ParleyError ? e : new ParleyError({ code: "internal", message: String(e) });
        for (const w of entry.waiters.splice(0)) w.reject(error);
      },
    );
  }

  /** Sets or clears "away" (kept across reconnects). */
  async setAway(away: boolean): Promise<void> {
    this.#away = away;
    if (this.#transport.ready) await this.request({ type: "presence.set", away });
  }

  /**
   * A user's presence as last known: from `presence.changed` events and `loadPresence`. Only
   * users who share a channel with you are reported by the server.
   */
  presenceOf(userId: string): Presence | undefined {
    return this.#presence.get(userId);
  }

  /** Fetches the presence of up to 200 users (`POST /v1/presence/query`) into `presenceOf`. */
  async loadPresence(userIds: readonly string[]): Promise<Presence[]> {
    const { presence } = await this.rest.queryPresence(userIds);
    for (const p of presence) this.#presence.set(p.user_id, p);
    return presence;
  }

  /** The unread count of a channel as last reported (`unread.updated` or `refreshUnread`). */
  unreadCount(channelId: string): number | undefined {
    return this.#unread.get(channelId)?.unreadCount;
  }

  /** Fetches every channel's unread count and read position (`GET /v1/channels`, every page). */
  async refreshUnread(): Promise<Map<string, { unreadCount: number; lastReadSeq: number }>> {
    const channels = await this.rest.allChannels();
    for (const c of channels) {
      this.#unread.set(c.id, { unreadCount: c.unread_count ?? 0, lastReadSeq: c.last_read_seq ?? 0 });
    }
    return new Map(this.#unread);
  }

  // ---- calls ----

  /** Joins an active call and returns the session that owns its RTCPeerConnections. */
  joinCall(callId: string, options: JoinCallOptions = {}): Promise<CallSession> {
    return joinCall(this, callId, options);
  }

  /** Starts a call in a channel (or finds the active one) and joins it. */
  async startCall(channelId: string, options: JoinCallOptions = {}): Promise<CallSession> {
    const call = await this.rest.startCall(channelId);
    return joinCall(this, call.id, options);
  }

  // ---- requests ----

  /**
   * Sends one request frame on the current connection and resolves with its `ack`. Fails with
   * `disconnected` if there is no connection or it drops before the answer, with `timeout`, or
   * with the server's error. A `rate_limited` refusal is retried after the delay the server states.
   */
  request(frame: ClientRequest, options: { timeoutMs?: number } = {}): Promise<AckFrame> {
    return this.#transport.request(frame, options.timeoutMs);
  }

  // ---- incoming frames ----

  #onFrame(frame: { type: string }): void {
    const type = frame.type;
    if (isChannelEventType(type)) {
      this.#onChannelEvent(frame as ChannelEvent);
      return;
    }
    switch (type) {
      case "typing":
        this.typing._onEvent(frame as TypingEvent);
        this.emit("typing", frame as TypingEvent);
        return;
      case "unread.updated": {
        const u = frame as UnreadUpdatedEvent;
        this.#unread.set(u.channel_id, { unreadCount: u.unread_count, lastReadSeq: u.last_read_seq });
        this.emit("unread.updated", u);
        return;
      }
      case "presence.changed": {
        const { type: _type, ...presence } = frame as PresenceChangedEvent;
        this.#presence.set(presence.user_id, presence);
        this.emit("presence.changed", frame as PresenceChangedEvent);
        return;
      }
      case "presence.batch": {
        // Several users' changes coalesced by the server: one `presence.changed` each.
        for (const presence of (frame as PresenceBatchFrame).presences) {
          this.#presence.set(presence.user_id, presence);
          this.emit("presence.changed", { type: "presence.changed", ...presence });
        }
        return;
      }
      case "read.updated":
      case "channel.added":
      case "call.signal":
      case "call.participant_reconnecting":
      case "call.participant_reconnected":
      case "call.mode_changed":
      case "call.active_speaker":
      case "call.sfu":
        this.emit(type, frame as never);
        return;
      default:
        return; // v1 is additive: unknown frames are ignored
    }
  }

  /** The socket dropped: everything on the wire goes back to waiting for the next one. */
  #onDropped(): void {
    this.#outbox.requeueAll();
    for (const sub of this.#subs.values()) sub.live = false;
  }

  /** After a welcome: resume or subscribe every channel, re-send read positions and away. */
  async #restore(previousSession: string | undefined, maxResumeChannels: number): Promise<void> {
    const resumable: Array<{ channel_id: string; seq: number }> = [];
    const fresh: string[] = [];
    for (const [channelId, sub] of this.#subs) {
      if (previousSession && sub.sequencer.delivered !== undefined) {
        resumable.push({ channel_id: channelId, seq: sub.sequencer.delivered });
      } else {
        fresh.push(channelId);
      }
    }
    const steps: Promise<unknown>[] = fresh.map((channelId) =>
      this.#subscribeOnServer(channelId, this.#subs.get(channelId) as Sub),
    );
    if (previousSession) {
      // At most `limits.max_resume_channels` per frame (the server refuses more): one resume per slice.
      const per = Math.max(1, maxResumeChannels || resumable.length);
      for (let i = 0; i < resumable.length; i += per) {
        steps.push(this.#resume(previousSession, resumable.slice(i, i + per)));
      }
    }
    // "Away" is best effort: a refusal must not keep the subscriptions from coming back.
    if (this.#away) steps.push(this.request({ type: "presence.set", away: true }).catch(() => {}));
    await Promise.all(steps);
  }

  async #resume(sessionId: string, channels: Array<{ channel_id: string; seq: number }>): Promise<void> {
    let ack: AckFrame;
    try {
      ack = await this.request({ type: "resume", session_id: sessionId, channels });
    } catch (e) {
      if (e instanceof ParleyError && e.code !== "disconnected" && e.code !== "timeout") {
        // Refused as a whole (e.g. another user's session): subscribe each channel and fill from history.
        await Promise.all(
          channels.map((c) => {
            const sub = this.#subs.get(c.channel_id);
            return sub ? this.#subscribeOnServer(c.channel_id, sub) : undefined;
          }),
        );
        return;
      }
      throw e;
    }
    const outcomes = new Map<string, ResumedChannel>((ack.resumed ?? []).map((r) => [r.channel_id, r]));
    for (const c of channels) {
      const sub = this.#subs.get(c.channel_id);
      if (!sub) continue;
      const outcome = outcomes.get(c.channel_id);
      if (!outcome) {
        await this.#subscribeOnServer(c.channel_id, sub);
        continue;
      }
      if (outcome.seq === undefined || outcome.seq === null) {
        this.#lose(c.channel_id, "not_a_member");
        continue;
      }
      this.#markLive(c.channel_id, sub, outcome.seq);
    }
  }

  async #subscribeOnServer(channelId: string, sub: Sub): Promise<void> {
    let ack: AckFrame;
    try {
      ack = await this.request({ type: "subscribe", channel_id: channelId });
    } catch (e) {
      if (e instanceof ParleyError && e.code !== "disconnected" && e.code !== "timeout") {
        // Refused (not a member, no such channel): the subscription ends here.
        if (this.#subs.get(channelId) === sub) this.#subs.delete(channelId);
        for (const w of sub.waiters.splice(0)) w.reject(e);
        return;
      }
      throw e;
    }
    if (this.#subs.get(channelId) !== sub) return;
    this.#markLive(channelId, sub, ack.seq ?? 0);
  }

  /** The server delivers `channelId` live after `seq`: release held events, fill any hole. */
  #markLive(channelId: string, sub: Sub, seq: number): void {
    sub.live = true;
    this.#deliver(sub.sequencer.liveAfter(seq));
    const delivered = sub.sequencer.delivered ?? seq;
    for (const w of sub.waiters.splice(0)) w.resolve({ channelId, seq: delivered });
    void this.#fill(channelId, sub);
  }

  #onChannelEvent(event: ChannelEvent): void {
    const sub = this.#subs.get(event.channel_id);
    if (!sub) return;
    this.#deliver(sub.sequencer.push(event));
    void this.#fill(event.channel_id, sub);
  }

  /** Fills the channel's holes from the channel's stored events, one at a time, until there is none. */
  async #fill(channelId: string, sub: Sub): Promise<void> {
    if (sub.filling) return;
    sub.filling = true;
    let failures = 0;
    try {
      for (let gap: Gap | null = sub.sequencer.gap(); gap; gap = sub.sequencer.gap()) {
        if (this.#subs.get(channelId) !== sub || !this.#transport.wanted) return;
        let page: EventPage;
        try {
          page = await this.rest.events(channelId, { after: gap.after, limit: MAX_HISTORY_LIMIT });
        } catch (e) {
          failures += 1;
          const error = e instanceof ParleyError ? e : new ParleyError({ code: "network", message: String(e) });
          if (error.code === "not_a_member" || error.code === "not_found") {
            this.#lose(channelId, "not_a_member");
            return;
          }
          this.emit("error", error);
          await sleep(Math.min(30_000, 500 * 2 ** Math.min(failures, 6)));
          continue;
        }
        failures = 0;
        const outcome = sub.sequencer.applyEvents(gap, page.events as ChannelEvent[], page.has_more);
        const recovered = outcome.events.filter((e) => e.fromHistory).length;
        this.#deliver(outcome.events);
        if (recovered > 0 || outcome.unrecoverable > 0) {
          this.emit("resync", {
            channelId,
            after: gap.after,
            through: sub.sequencer.delivered ?? gap.through,
            recovered,
            unrecoverable: outcome.unrecoverable,
          });
        }
      }
    } finally {
      sub.filling = false;
    }
  }

  #deliver(events: DeliveredEvent[]): void {
    const me = this.connection.welcome?.user_id;
    for (const event of events) {
      if (event.type === "message.new") this.typing._onMessage(event.channel_id, event.message.sender_id);
      this.emit("event", event);
      this.emit(event.type, event as never);
      if (event.type === "member.removed" && event.user_id === me) this.#lose(event.channel_id, "removed");
      if (event.type === "channel.deleted") this.#lose(event.channel_id, "channel_deleted");
    }
  }

  #lose(channelId: string, reason: SubscriptionLost["reason"]): void {
    const sub = this.#subs.get(channelId);
    if (!sub) return;
    this.#subs.delete(channelId);
    for (const w of sub.waiters.splice(0)) {
      w.reject(new ParleyError({ code: "not_a_member", message: `subscription to ${channelId} ended: ${reason}` }));
    }
    this.emit("subscription.lost", { channelId, reason });
  }

  // ---- outbox ----

  #pumpOutbox(): void {
    clearTimeout(this.#outboxTimer);
    this.#outboxTimer = undefined;
    if (!this.#transport.ready || this.connection.state !== "connected") return;
    const now = Date.now();
    const limits = this.connection.welcome?.limits;
    for (const entry of this.#outbox.ready(now)) {
      if (limits && [...entry.text].length > limits.max_text_chars) {
        this.#failSend(
          entry,
          new ParleyError({
            code: "invalid_argument",
            message: `text is ${[...entry.text].length} characters, the server accepts ${limits.max_text_chars}`,
          }),
        );
        continue;
      }
      this.#outbox.markSending(entry.clientMsgId);
      this.request({
        type: "message.send",
        channel_id: entry.channelId,
        client_msg_id: entry.clientMsgId,
        text: entry.text,
        ...(entry.metadata === undefined ? {} : { metadata: entry.metadata }),
      }).then(
        (ack) => this.#sendAcked(entry, ack),
        (e: unknown) => this.#sendFailed(entry, e),
      );
    }
    const due = this.#outbox.nextDue(now);
    if (due !== undefined) this.#outboxTimer = setTimeout(() => this.#pumpOutbox(), due - now);
  }

  #sendAcked(entry: OutboxEntry, ack: AckFrame): void {
    if (!this.#outbox.has(entry.clientMsgId)) return;
    if (!ack.message) {
      this.#failSend(entry, new ParleyError({ code: "bad_response", message: "message.send ack without a message" }));
      return;
    }
    this.#outbox.remove(entry.clientMsgId);
    this.#saveOutbox();
    const result: SendResult = { message: ack.message, created: ack.created ?? true };
    this.#sendWaiters.get(entry.clientMsgId)?.resolve(result);
    this.#sendWaiters.delete(entry.clientMsgId);
    this.emit("outbox.sent", { clientMsgId: entry.clientMsgId, result });
    this.#pumpOutbox();
  }

  #sendFailed(entry: OutboxEntry, e: unknown): void {
    if (!this.#outbox.has(entry.clientMsgId)) return;
    const error = e instanceof ParleyError ? e : new ParleyError({ code: "internal", message: String(e) });
    switch (error.code) {
      case "disconnected":
        this.#outbox.requeue(entry.clientMsgId);
        return; // sent again once reconnected
      case "timeout":
        this.#outbox.requeue(entry.clientMsgId);
        break; // the same key again: the server stores it once
      case "rate_limited":
        this.#outbox.requeue(entry.clientMsgId, Date.now() + (error.retryAfterMs ?? 1000));
        break;
      case "unavailable":
      case "internal":
        if (entry.attempts < this.#maxSendAttempts) {
          this.#outbox.requeue(entry.clientMsgId, Date.now() + Math.min(30_000, 250 * 2 ** entry.attempts));
          break;
        }
        this.#failSend(entry, error);
        break;
      default:
        this.#failSend(entry, error);
    }
    this.#pumpOutbox();
  }

  #failSend(entry: OutboxEntry, error: ParleyError): void {
    this.#outbox.remove(entry.clientMsgId);
    this.#saveOutbox();
    this.#sendWaiters.get(entry.clientMsgId)?.reject(error);
    this.#sendWaiters.delete(entry.clientMsgId);
    this.emit("outbox.failed", { clientMsgId: entry.clientMsgId, error });
  }

  #saveOutbox(): void {
    if (!this.#outboxStore) return;
    try {
      this.#outboxStore.save(
        this.#outbox.pending().map((e) => ({
          clientMsgId: e.clientMsgId,
          channelId: e.channelId,
          text: e.text,
          ...(e.metadata === undefined ? {} : { metadata: e.metadata }),
        })),
      );
    } catch (e) {
      this.emit("error", new ParleyError({ code: "internal", message: `the outbox store failed: ${String(e)}`, cause: e }));
    }
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
