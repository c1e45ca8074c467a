//! `RestClient`: one method per operation of the v1 REST API (the server's OpenAPI document),
//! typed errors, and automatic retries where a retry cannot do harm.
import { parseRetryAfter } from "./backoff.js";
import { Endpoints, type UrlOrder } from "./endpoints.js";
import { ParleyError } from "./errors.js";
import type {
  AddMemberRequest,
  Call,
  CallList,
  Channel,
  ChannelList,
  CreateChannelRequest,
  DevToken,
  DevTokenRequest,
  EditMessageRequest,
  JoinedCall,
  Member,
  MemberList,
  MemberRole,
  Message,
  EventPage,
  MessagePage,
  Presence,
  PresenceList,
  ReadState,
  SendMessageRequest,
  SendResult,
  TypingState,
  UpdateMemberRequest,
} from "./types.js";

/** A bearer token, or a function that returns a fresh one (called for every request). */
export type TokenSource = string | (() => string | Promise<string>);

export interface RestClientOptions {
  /**
   * The server's base URL, e.g. `http://127.0.0.1:8080`, or several addresses of the same
   * deployment (its edges): requests go to one; after a network error the next one takes over,
   * and a request whose connection was refused (it never reached a server) is sent to the next
   * address at once. See docs/failover.md.
   */
  baseUrl: string | readonly string[] | Endpoints;
  /** The order in which several addresses are used. Default `random`. */
  urlOrder?: UrlOrder;
  token: TokenSource;
  /** `fetch` to use; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Per-request timeout. Default 15 s. */
  timeoutMs?: number;
  /**
   * Retries of a request refused with 429 `rate_limited` (never executed, so always safe) or, for
   * idempotent requests, failed with 503 or a network error. Default 2.
   */
  maxRetries?: number;
}

/** History paging: at most one anchor; `limit` 1–200 (server default 50). */
export type HistoryQuery =
  | { before?: number; after?: undefined; around?: undefined; limit?: number }
  | { after: number; before?: undefined; around?: undefined; limit?: number }
  | { around: number; before?: undefined; after?: undefined; limit?: number };

/** The largest history page the server serves. */
export const MAX_HISTORY_LIMIT = 200;

/** Channel list paging: `limit` 1–200 (server default 100), `cursor` a previous page's `next_cursor`. */
export interface ChannelListQuery {
  limit?: number;
  cursor?: string;
}

/** The largest channel page the server serves (its default is 100). */
export const MAX_CHANNEL_PAGE = 200;

interface Request {
  method: "GET" | "POST" | "PUT" | "PATCH" | "DELETE";
  path: string;
  body?: unknown;
  query?: Record<string, number | string | undefined>;
  /** Safe to repeat after a 503 or a network error. */
  idempotent: boolean;
  auth?: boolean;
}

export class RestClient {
  readonly #endpoints: Endpoints;
  readonly #token: TokenSource;
  readonly #fetch: typeof fetch;
  readonly #timeoutMs: number;
  readonly #maxRetries: number;

  constructor(options: RestClientOptions) {
    this.#endpoints =
      options.baseUrl instanceof Endpoints ? options.baseUrl : new Endpoints(options.baseUrl, options.urlOrder);
    this.#token = options.token;
    const f = options.fetch ?? globalThis.fetch;
    if (typeof f !== "function") throw new TypeError("parley: no fetch available; pass `fetch`");
    this.#fetch = f.bind(globalThis);
    this.#timeoutMs = options.timeoutMs ?? 15_000;
    this.#maxRetries = options.maxRetries ?? 2;
  }

  /** The address requests go to now (with several addresses, the one that last answered). */
  get baseUrl(): string {
    return this.#endpoints.current;
  }

  /** Every address of the deployment, in the order they are tried. */
  get baseUrls(): readonly string[] {
    return this.#endpoints.all;
  }

  // ---- channels ----

  /**
   * One page of your channels, newest first, each with `last_seq`, `last_read_seq` and
   * `unread_count`. Pass the page's `next_cursor` as `cursor` for the next one; it is `null` on
   * the last page. `allChannels()` follows the cursors for you.
   */
  listChannels(query: ChannelListQuery = {}): Promise<ChannelList> {
    if (query.limit !== undefined && (query.limit < 1 || query.limit > MAX_CHANNEL_PAGE)) {
      return Promise.reject(
        new ParleyError({ code: "invalid_argument", message: `limit must be 1–${MAX_CHANNEL_PAGE}, got ${query.limit}` }),
      );
    }
    return this.#call({
      method: "GET",
      path: "/v1/channels",
      query: { limit: query.limit, cursor: query.cursor },
      idempotent: true,
    });
  }

  /** Every one of your channels, newest first: `listChannels` page after page until the last. */
  async allChannels(options: { pageSize?: number } = {}): Promise<Channel[]> {
    const all: Channel[] = [];
    let cursor: string | undefined;
    for (;;) {
      const page = await this.listChannels({ limit: options.pageSize ?? MAX_CHANNEL_PAGE, cursor });
      all.push(...page.channels);
      if (page.next_cursor === null || page.next_cursor === undefined) return all;
      cursor = page.next_cursor;
    }
  }

  /** Creates a channel (`{kind: "channel", name, members?}`) or a DM (`{kind: "dm", members: [other]}`). */
  createChannel(body: CreateChannelRequest): Promise<Channel> {
    return this.#call({ method: "POST", path: "/v1/channels", body, idempotent: false });
  }

  getChannel(channelId: string): Promise<Channel> {
    return this.#call({ method: "GET", path: `/v1/channels/${enc(channelId)}`, idempotent: true });
  }

  /** Renames a channel (moderators and owners). */
  renameChannel(channelId: string, name: string): Promise<Channel> {
    return this.#call({ method: "PATCH", path: `/v1/channels/${enc(channelId)}`, body: { name }, idempotent: true });
  }

  /** Deletes a channel (owners; either party of a DM). */
  deleteChannel(channelId: string): Promise<void> {
    return this.#call({ method: "DELETE", path: `/v1/channels/${enc(channelId)}`, idempotent: true });
  }

  // ---- members ----

  listMembers(channelId: string): Promise<MemberList> {
    return this.#call({ method: "GET", path: `/v1/channels/${enc(channelId)}/members`, idempotent: true });
  }

  addMember(channelId: string, body: AddMemberRequest): Promise<Member> {
    return this.#call({ method: "POST", path: `/v1/channels/${enc(channelId)}/members`, body, idempotent: true });
  }

  /**
   * Changes a member's role; resolves to the member as they now are. Only an owner changes another
   * member's role; anyone may lower their own. Demoting the channel's only owner is refused
   * (`conflict`). Others receive `member.updated`.
   */
  updateMemberRole(channelId: string, userId: string, role: MemberRole): Promise<Member> {
    return this.#call({
      method: "PATCH",
      path: `/v1/channels/${enc(channelId)}/members/${enc(userId)}`,
      body: { role } satisfies UpdateMemberRequest,
      idempotent: true,
    });
  }

  /** Removes a member (or leaves, with your own user id). */
  removeMember(channelId: string, userId: string): Promise<void> {
    return this.#call({
      method: "DELETE",
      path: `/v1/channels/${enc(channelId)}/members/${enc(userId)}`,
      idempotent: true,
    });
  }

  // ---- messages ----

  /** A page of history, ascending by seq. Without an anchor: the newest page. */
  history(channelId: string, query: HistoryQuery = {}): Promise<MessagePage> {
    if (query.limit !== undefined && (query.limit < 1 || query.limit > MAX_HISTORY_LIMIT)) {
      return Promise.reject(
        new ParleyError({ code: "invalid_argument", message: `limit must be 1–${MAX_HISTORY_LIMIT}, got ${query.limit}` }),
      );
    }
    return this.#call({
      method: "GET",
      path: `/v1/channels/${enc(channelId)}/messages`,
      query: { before: query.before, after: query.after, around: query.around, limit: query.limit },
      idempotent: true,
    });
  }

  /**
   * The channel's persisted events after `after` (default 0), ascending by seq, `limit` 1–200
   * (server default 100): messages, edits, deletions, membership changes and renames, each in the
   * shape of its realtime event. `has_more` says to ask again from the last seq.
   */
  events(channelId: string, query: { after?: number; limit?: number } = {}): Promise<EventPage> {
    if (query.limit !== undefined && (query.limit < 1 || query.limit > MAX_HISTORY_LIMIT)) {
      return Promise.reject(
        new ParleyError({ code: "invalid_argument", message: `limit must be 1–${MAX_HISTORY_LIMIT}, got ${query.limit}` }),
      );
    }
    return this.#call({
      method: "GET",
      path: `/v1/channels/${enc(channelId)}/events`,
      query: { after: query.after, limit: query.limit },
      idempotent: true,
    });
  }

  /**
   * Sends a message over REST. Idempotent on `client_msg_id` (so it is retried like a read): a
   * retry returns the original message with `created: false`; the same key with another body
   * fails with `idempotency_conflict`.
   */
  sendMessage(channelId: string, body: SendMessageRequest): Promise<SendResult> {
    return this.#call({ method: "POST", path: `/v1/channels/${enc(channelId)}/messages`, body, idempotent: true });
  }

  editMessage(channelId: string, messageId: string, body: EditMessageRequest): Promise<Message> {
    return this.#call({
      method: "PATCH",
      path: `/v1/channels/${enc(channelId)}/messages/${enc(messageId)}`,
      body,
      idempotent: true,
    });
  }

  /** Deletes a message; returns its tombstone. */
  deleteMessage(channelId: string, messageId: string): Promise<Message> {
    return this.#call({
      method: "DELETE",
      path: `/v1/channels/${enc(channelId)}/messages/${enc(messageId)}`,
      idempotent: true,
    });
  }

  // ---- read state, typing, presence ----

  readState(channelId: string): Promise<ReadState> {
    return this.#call({ method: "GET", path: `/v1/channels/${enc(channelId)}/read`, idempotent: true });
  }

  /** Moves your read position forward to `seq` (clamped to the channel's last seq). */
  markRead(channelId: string, seq: number): Promise<ReadState> {
    return this.#call({ method: "PUT", path: `/v1/channels/${enc(channelId)}/read`, body: { seq }, idempotent: true });
  }

  typing(channelId: string, state: TypingState): Promise<void> {
    return this.#call({ method: "POST", path: `/v1/channels/${enc(channelId)}/typing`, body: { state }, idempotent: true });
  }

  /** A user's presence (only users who share a channel with you; others are `not_found`). */
  userPresence(userId: string): Promise<Presence> {
    return this.#call({ method: "GET", path: `/v1/users/${enc(userId)}/presence`, idempotent: true });
  }

  /** Presence of up to 200 users; users who share no channel with you are left out. */
  queryPresence(userIds: readonly string[]): Promise<PresenceList> {
    return this.#call({ method: "POST", path: "/v1/presence/query", body: { user_ids: userIds }, idempotent: true });
  }

  // ---- calls ----

  /** Starts a call in a channel, or returns the active one. */
  startCall(channelId: string): Promise<Call> {
    return this.#call({ method: "POST", path: `/v1/channels/${enc(channelId)}/calls`, idempotent: true });
  }

  /** A channel's calls, newest first. */
  channelCalls(channelId: string): Promise<CallList> {
    return this.#call({ method: "GET", path: `/v1/channels/${enc(channelId)}/calls`, idempotent: true });
  }

  getCall(callId: string): Promise<Call> {
    return this.#call({ method: "GET", path: `/v1/calls/${enc(callId)}`, idempotent: true });
  }

  /** Joins an active call (idempotent per user): participant id, peers with roles, ICE servers. */
  joinCall(callId: string): Promise<JoinedCall> {
    return this.#call({ method: "POST", path: `/v1/calls/${enc(callId)}/join`, idempotent: true });
  }

  leaveCall(callId: string, participantId: string): Promise<void> {
    return this.#call({
      method: "POST",
      path: `/v1/calls/${enc(callId)}/leave`,
      body: { participant_id: participantId },
      idempotent: true,
    });
  }

  /** Ends a call for everyone (owners and moderators; either party of a DM). */
  endCall(callId: string): Promise<void> {
    return this.#call({ method: "POST", path: `/v1/calls/${enc(callId)}/end`, idempotent: true });
  }

  // ---- development ----

  /**
   * `POST /v1/dev/token`: a token for any user, signed with the server's development key. Only a
   * server running with its generated development key answers (404 otherwise). Sent without a
   * token; use it to sign in during development, never in production.
   */
  devToken(body: DevTokenRequest): Promise<DevToken> {
    return this.#call({ method: "POST", path: "/v1/dev/token", body, idempotent: true, auth: false });
  }

  /** `devToken` without a client: `RestClient.devToken("http://127.0.0.1:8080", {user_id: "alice"})`. */
  static devToken(baseUrl: string, body: DevTokenRequest, fetchImpl?: typeof fetch): Promise<DevToken> {
    return new RestClient({ baseUrl, token: "", ...(fetchImpl ? { fetch: fetchImpl } : {}) }).devToken(body);
  }

  // ---- plumbing ----

  async #call<T>(req: Request): Promise<T> {
    // Refused connections move on through the other addresses without counting as retries:
    // the request reached no server, so any request may go again.
    let refusals = 0;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#once<T>(req);
      } catch (e) {
        if (e instanceof ParleyError && e.code === "network" && refused(e.cause) && refusals < this.#endpoints.size - 1) {
          refusals += 1;
          attempt -= 1;
          continue;
        }
        if (!(e instanceof ParleyError) || attempt >= this.#maxRetries) throw e;
        const safe = e.code === "rate_limited" || (req.idempotent && (e.code === "unavailable" || e.code === "network"));
        if (!safe) throw e;
        await sleep(e.retryAfterMs ?? 250 * 2 ** attempt);
      }
    }
  }

  async #once<T>(req: Request): Promise<T> {
    const base = this.#endpoints.current;
    const url = new URL(base + req.path);
    for (const [key, value] of Object.entries(req.query ?? {})) {
      if (value !== undefined) url.searchParams.set(key, String(value));
    }
    const headers: Record<string, string> = { accept: "application/json" };
    if (req.auth !== false) {
      const token = typeof this.#token === "function" ? await this.#token() : this.#token;
      headers.authorization = `Bearer ${token}`;
    }
    if (req.body !== undefined) headers["content-type"] = "application/json";
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.#timeoutMs);
    let response: Response;
    try {
      response = await this.#fetch(url, {
        method: req.method,
        headers,
        body: req.body === undefined ? null : JSON.stringify(req.body),
        signal: controller.signal,
      });
    } catch (cause) {
      clearTimeout(timer);
      const timedOut = controller.signal.aborted;
      // This address did not answer: the next request goes to the next one.
      this.#endpoints.failed(base);
      throw new ParleyError({
        code: timedOut ? "timeout" : "network",
        message: timedOut
          ? `${req.method} ${req.path}: no answer within ${this.#timeoutMs} ms`
          : `${req.method} ${req.path}: ${String((cause as Error)?.message ?? cause)}`,
        cause,
      });
    }
    try {
      const text = await response.text();
      if (response.ok) {
        if (response.status === 204 || text === "") return undefined as T;
        return parseJson(text, req) as T;
      }
      throw errorFromResponse(response, text, req);
    } finally {
      clearTimeout(timer);
    }
  }
}

/** Whether a `fetch` failure was a refused connection (Node's undici: `cause.code`). */
function refused(cause: unknown): boolean {
  for (let c = cause, depth = 0; c && typeof c === "object" && depth < 4; c = (c as { cause?: unknown }).cause, depth++) {
    if ((c as { code?: unknown }).code === "ECONNREFUSED") return true;
  }
  return false;
}

function errorFromResponse(response: Response, text: string, req: Request): ParleyError {
  const headerRequestId = response.headers.get("x-request-id") ?? undefined;
  const retryAfterHeader = parseRetryAfter(response.headers.get("retry-after"));
  let detail: { code?: unknown; message?: unknown; request_id?: unknown; retry_after_ms?: unknown } | undefined;
  try {
    const body = JSON.parse(text) as { error?: typeof detail };
    detail = body?.error;
  } catch {
    detail = undefined;
  }
  const code = typeof detail?.code === "string" ? detail.code : statusCode(response.status);
  const message =
    typeof detail?.message === "string"
      ? detail.message
      : `${req.method} ${req.path}: HTTP ${response.status} ${text.slice(0, 200)}`;
  return new ParleyError({
    code,
    message,
    status: response.status,
    requestId: typeof detail?.request_id === "string" ? detail.request_id : headerRequestId,
    retryAfterMs: typeof detail?.retry_after_ms === "number" ? detail.retry_after_ms : retryAfterHeader,
  });
}

/** A code for an error answer without a Parley error body (a proxy's, say). */
function statusCode(status: number): string {
  if (status === 429) return "rate_limited";
  if (status === 503 || status === 502 || status === 504) return "unavailable";
  if (status >= 500) return "internal";
  if (status === 404) return "route_not_found";
  return "bad_response";
}

function parseJson(text: string, req: Request): unknown {
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw new ParleyError({ code: "bad_response", message: `${req.method} ${req.path}: the answer is not JSON`, cause });
  }
}

function enc(segment: string): string {
  return encodeURIComponent(segment);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
