//! `Transport`: one authenticated WebSocket at a time, and the loop that replaces it when it
//! drops (exponential backoff with jitter, at least the delay the server asked for). It owns
//! request/answer matching, the frame budget and the client-side heartbeat, and drives the
//! visible `Connection` state. What the connection carries (subscriptions, the outbox) is the
//! client's: the transport calls `restore` after each welcome and reports `connected` only once
//! that is done.
import { Backoff, type BackoffOptions } from "./backoff.js";
import { WS_OPEN, type Connection, type WebSocketConstructor, type WebSocketLike } from "./connection.js";
import { type Endpoints, wsUrlOf } from "./endpoints.js";
import { ParleyError } from "./errors.js";
import { CloseCode, SUBPROTOCOL, type ClientRequest } from "./protocol.js";
import type { TokenSource } from "./rest.js";
import type { AckFrame, ErrorFrame, WelcomeFrame } from "./types.js";

/** What the transport asks of its owner. */
export interface TransportHooks {
  /**
   * A new socket is authenticated. Resume or re-subscribe, then resolve: the state becomes
   * `connected` (if `isCurrent()` still holds). `previousSessionId` is the last socket's session.
   */
  restore(welcome: WelcomeFrame, previousSessionId: string | undefined, isCurrent: () => boolean): Promise<void>;
  /** Any frame that is not a welcome, nor the answer of a pending request. */
  frame(frame: { type: string }): void;
  /** An error not tied to a request (usually the reason of a close that follows). */
  error(error: ParleyError): void;
  /** The socket is gone; pending requests have failed with `disconnected`. */
  dropped(): void;
  /** The connection cannot be made again (a refused static token). */
  fatal(error: ParleyError): void;
}

export interface TransportOptions {
  /**
   * The deployment's addresses. Each attempt connects to the current one; a socket that drops
   * or cannot be opened hands over to the next (the backoff still applies between attempts).
   */
  endpoints: Endpoints;
  token: TokenSource;
  WebSocket: WebSocketConstructor;
  backoff?: BackoffOptions | undefined;
  requestTimeoutMs: number;
  connection: Connection;
  hooks: TransportHooks;
}

interface Pending {
  resolve: (ack: AckFrame) => void;
  reject: (e: ParleyError) => void;
  timer: ReturnType<typeof setTimeout>;
}

export class Transport {
  readonly #o: TransportOptions;
  readonly #backoff: Backoff;
  #ws: WebSocketLike | undefined;
  /** The base URL the current socket was opened to. */
  #base = "";
  /** The socket is authenticated (welcome received): requests may be sent. */
  #ready = false;
  #wanted = false;
  #everConnected = false;
  #sessionId: string | undefined;
  #nextId = 1;
  readonly #pending = new Map<string, Pending>();
  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #welcomeTimer: ReturnType<typeof setTimeout> | undefined;
  /** Set by a `reconnect` frame: when to leave the draining node. */
  #drainTimer: ReturnType<typeof setTimeout> | undefined;
  /** The next reconnect follows a `reconnect` frame: no backoff (the hint was the delay). */
  #reconnectAtOnce = false;
  #heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  /** When to replace the connection's token (`auth.refresh`) before it expires. */
  #refreshTimer: ReturnType<typeof setTimeout> | undefined;
  /** The connection's token `exp` as the server last stated it (seconds since the epoch). */
  #tokenExpiresAt = 0;
  /** The server asked to wait this long (an error frame's `retry_after_ms`) before the next try. */
  #serverRetryAfterMs: number | undefined;
  #lastError: ParleyError | undefined;

  // Frame budget: a token bucket just under the welcome's limits, so the server never refuses.
  #tokens = 0;
  #tokensAt = 0;
  #ratePerMs = 0.045;
  #burst = 90;
  readonly #outQueue: string[] = [];
  #outTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(options: TransportOptions) {
    this.#o = options;
    this.#backoff = new Backoff(options.backoff);
  }

  /** Authenticated and able to carry requests (the state may still be restoring). */
  get ready(): boolean {
    return this.#ready;
  }

  /** Whether the transport is trying to be connected (between `start` and `stop`). */
  get wanted(): boolean {
    return this.#wanted;
  }

  start(): void {
    if (this.#wanted) return;
    this.#wanted = true;
    this.#o.connection._transition("connecting");
    this.#open();
  }

  stop(reason: string): void {
    this.#wanted = false;
    clearTimeout(this.#reconnectTimer);
    const ws = this.#ws;
    this.#dropSocket();
    try {
      ws?.close(1000, "client closed");
    } catch {
      /* already closed */
    }
    this.#o.connection._transition("disconnected", { reason });
  }

  /** Drops the current socket as a network fault would; the loop reconnects. */
  reconnectNow(): void {
    if (this.#ws) this.#socketLost(this.#ws, "reconnect requested", undefined);
  }

  /**
   * Sends one request on the current socket; resolves with its `ack`. Fails with `disconnected`
   * (no socket, or it dropped before the answer), `timeout`, or the server's error. A
   * `rate_limited` refusal (never executed) is retried after the delay the server states.
   */
  async request(frame: ClientRequest, timeoutMs = this.#o.requestTimeoutMs): Promise<AckFrame> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.#requestOnce(frame, timeoutMs);
      } catch (e) {
        if (e instanceof ParleyError && e.code === "rate_limited" && attempt < 5) {
          await sleep(e.retryAfterMs ?? 1000);
          continue;
        }
        throw e;
      }
    }
  }

  #requestOnce(frame: ClientRequest, timeoutMs: number): Promise<AckFrame> {
    if (!this.#ws || !this.#ready) {
      return Promise.reject(new ParleyError({ code: "disconnected", message: `${frame.type}: not connected` }));
    }
    const id = String(this.#nextId++);
    return new Promise<AckFrame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new ParleyError({ code: "timeout", message: `${frame.type}: no answer within ${timeoutMs} ms` }));
      }, timeoutMs);
      this.#pending.set(id, { resolve, reject, timer });
      this.#enqueueFrame({ ...frame, id });
    });
  }

  // ---- the socket ----

  #open(): void {
    if (!this.#wanted) return;
    this.#o.connection._attempt();
    const base = this.#o.endpoints.current;
    this.#o.connection._setUrl(base);
    let ws: WebSocketLike;
    try {
      ws = new this.#o.WebSocket(wsUrlOf(base), [SUBPROTOCOL]) as WebSocketLike;
    } catch (e) {
      this.#o.endpoints.failed(base);
      this.#scheduleReconnect(`cannot open a WebSocket to ${base}: ${String(e)}`);
      return;
    }
    this.#ws = ws;
    this.#base = base;
    this.#ready = false;
    this.#welcomeTimer = setTimeout(() => this.#socketLost(ws, "no welcome in time", undefined), this.#o.requestTimeoutMs);
    ws.onopen = () => {
      if (ws === this.#ws) void this.#authenticate(ws);
    };
    ws.onmessage = (event) => {
      if (ws !== this.#ws) return;
      let frame: { type?: unknown };
      try {
        frame = JSON.parse(typeof event.data === "string" ? event.data : String(event.data)) as { type?: unknown };
      } catch {
        this.#o.hooks.error(new ParleyError({ code: "bad_response", message: "a frame that is not JSON" }));
        return;
      }
      if (typeof frame.type === "string") this.#onFrame(ws, frame as { type: string });
    };
    ws.onclose = (event) => {
      if (ws === this.#ws) this.#socketLost(ws, `closed ${event.code}${event.reason ? ` (${event.reason})` : ""}`, event.code);
    };
    ws.onerror = () => {
      // `close` follows.
    };
  }

  async #authenticate(ws: WebSocketLike): Promise<void> {
    const source = this.#o.token;
    let token: string;
    try {
      token = typeof source === "function" ? await source() : source;
    } catch (e) {
      this.#lastError = new ParleyError({ code: "token_missing", message: `the token source failed: ${String(e)}`, cause: e });
      this.#socketLost(ws, "token source failed", undefined);
      return;
    }
    if (ws === this.#ws && ws.readyState === WS_OPEN) ws.send(JSON.stringify({ type: "auth", token }));
  }

  /** The socket is gone (closed, failed, or given up on): clean up and plan the next attempt. */
  #socketLost(ws: WebSocketLike, reason: string, code: number | undefined): void {
    if (ws !== this.#ws) return;
    this.#dropSocket();
    // Whatever ended it (the node died, drains, or the path to it broke), the next attempt goes
    // to the next address of the deployment; with one address this changes nothing.
    this.#o.endpoints.failed(this.#base);
    try {
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close();
    } catch {
      /* already closed */
    }
    if (!this.#wanted) return;
    const error = this.#lastError;
    this.#lastError = undefined;
    if (code === CloseCode.AuthenticationFailed && typeof this.#o.token === "string") {
      // A static token the server refused will be refused again: stop and say why.
      this.#wanted = false;
      const fatal = error ?? new ParleyError({ code: "token_invalid_claims", message: "the server refused the token" });
      this.#o.connection._transition("disconnected", { reason, error: fatal });
      this.#o.hooks.fatal(fatal);
      return;
    }
    this.#scheduleReconnect(reason, error);
  }

  #dropSocket(): void {
    const hadSocket = this.#ws !== undefined;
    this.#ws = undefined;
    this.#ready = false;
    clearTimeout(this.#welcomeTimer);
    clearTimeout(this.#drainTimer);
    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#refreshTimer);
    clearTimeout(this.#outTimer);
    this.#outTimer = undefined;
    this.#outQueue.length = 0;
    const lost = new ParleyError({ code: "disconnected", message: "the connection dropped before the answer" });
    for (const [id, p] of this.#pending) {
      clearTimeout(p.timer);
      this.#pending.delete(id);
      p.reject(lost);
    }
    if (hadSocket) this.#o.hooks.dropped();
  }

  #scheduleReconnect(reason: string, error?: ParleyError): void {
    clearTimeout(this.#reconnectTimer);
    const delay = this.#reconnectAtOnce ? 0 : this.#backoff.next(this.#serverRetryAfterMs);
    this.#reconnectAtOnce = false;
    this.#serverRetryAfterMs = undefined;
    this.#o.connection._transition("reconnecting", { reason, retryInMs: delay, ...(error ? { error } : {}) });
    this.#reconnectTimer = setTimeout(() => this.#open(), delay);
  }

  // ---- incoming frames ----

  #onFrame(ws: WebSocketLike, frame: { type: string }): void {
    switch (frame.type) {
      case "welcome":
        this.#onWelcome(ws, frame as WelcomeFrame);
        return;
      case "ack":
      case "pong": {
        const id = (frame as unknown as { id: string }).id;
        const p = this.#pending.get(id);
        if (!p) return;
        this.#pending.delete(id);
        clearTimeout(p.timer);
        p.resolve(frame.type === "ack" ? (frame as AckFrame) : { type: "ack", id });
        return;
      }
      case "error":
        this.#onError(frame as ErrorFrame);
        return;
      case "reconnect":
        this.#onReconnectHint(ws, (frame as { delay_ms?: number }).delay_ms ?? 0);
        return;
      default:
        this.#o.hooks.frame(frame);
    }
  }

  /**
   * The server drains (a rolling deploy): after the hinted delay (jittered by the server), and
   * once the requests in flight on this socket are answered (at most 2 s more), leave it and
   * reconnect at once; the new connection resumes (behind a load balancer, on another node).
   */
  #onReconnectHint(ws: WebSocketLike, delayMs: number): void {
    clearTimeout(this.#drainTimer);
    const settleBy = Date.now() + Math.max(0, delayMs) + 2_000;
    const leave = () => {
      if (ws !== this.#ws) return;
      if (this.#pending.size > 0 && Date.now() < settleBy) {
        this.#drainTimer = setTimeout(leave, 20);
        return;
      }
      this.#reconnectAtOnce = true;
      try {
        ws.close(1000, "server asked to reconnect");
      } catch {
        /* already closed */
      }
      this.#socketLost(ws, "server draining", undefined);
    };
    this.#drainTimer = setTimeout(leave, Math.max(0, delayMs));
  }

  #onError(frame: ErrorFrame): void {
    const error = new ParleyError({
      code: frame.code,
      message: frame.message,
      retryAfterMs: frame.retry_after_ms ?? undefined,
      reason: frame.reason ?? undefined,
    });
    if (frame.code === "rate_limited" && frame.retry_after_ms) this.#pauseFrames(frame.retry_after_ms);
    const id = frame.id ?? undefined;
    const p = id === undefined ? undefined : this.#pending.get(id);
    if (p && id !== undefined) {
      this.#pending.delete(id);
      clearTimeout(p.timer);
      p.reject(error);
      return;
    }
    this.#lastError = error;
    if (frame.retry_after_ms) this.#serverRetryAfterMs = frame.retry_after_ms;
    this.#o.hooks.error(error);
  }

  #onWelcome(ws: WebSocketLike, welcome: WelcomeFrame): void {
    clearTimeout(this.#welcomeTimer);
    this.#o.connection._setWelcome(welcome);
    const limits = welcome.limits;
    this.#ratePerMs = Math.max(1, limits.frames_per_second * 0.9) / 1000;
    this.#burst = Math.max(1, Math.floor(limits.frame_burst * 0.9));
    this.#tokens = this.#burst;
    this.#tokensAt = Date.now();
    this.#ready = true;
    const previous = this.#sessionId;
    this.#sessionId = welcome.session_id;
    this.#startHeartbeat(ws, welcome.heartbeat_interval_ms);
    this.#tokenExpiresAt = welcome.token_expires_at;
    this.#scheduleRefresh(ws, welcome.token_expires_in_ms);
    const isCurrent = () => ws === this.#ws;
    this.#o.hooks.restore(welcome, previous, isCurrent).then(
      () => {
        if (!isCurrent()) return;
        const reconnected = this.#everConnected;
        this.#everConnected = true;
        this.#backoff.reset();
        this.#o.connection._transition("connected", { reconnected });
      },
      (e: unknown) => {
        if (!isCurrent()) return; // dropped meanwhile; the next socket restores
        // Subscriptions are not all back (a request timed out): start over on a new socket
        // rather than report a connection that misses events.
        const error = e instanceof ParleyError ? e : new ParleyError({ code: "internal", message: String(e) });
        this.#o.hooks.error(error);
        this.#lastError = error;
        this.#socketLost(ws, `could not restore the subscriptions: ${error.message}`, undefined);
      },
    );
  }

  #startHeartbeat(ws: WebSocketLike, intervalMs: number): void {
    clearInterval(this.#heartbeatTimer);
    // Browsers cannot see the server's WebSocket pings, so the client checks the path itself:
    // a `ping` without a `pong` means the connection is dead even if no close arrived.
    const every = Math.max(1_000, Math.min(intervalMs, 25_000));
    this.#heartbeatTimer = setInterval(() => {
      if (ws !== this.#ws) return;
      this.request({ type: "ping" }).catch((e: unknown) => {
        if (ws === this.#ws && e instanceof ParleyError && e.code === "timeout") this.#socketLost(ws, "no pong in time", undefined);
      });
    }, every);
  }

  // ---- token refresh ----

  /**
   * The server closes the connection (4011) when its token expires. With a token function, the
   * transport asks it for a new token ahead of that and sends `auth.refresh`: a quarter of the
   * remaining lifetime ahead, between 1 s and 60 s. A static token cannot be refreshed: the
   * connection ends at its expiry, and reconnecting with it is refused. Refreshing stops when a
   * refresh brings no later expiry (a function that returns the same token until it expires).
   */
  #scheduleRefresh(ws: WebSocketLike, expiresInMs: number | undefined): void {
    clearTimeout(this.#refreshTimer);
    if (typeof this.#o.token !== "function" || !(expiresInMs !== undefined && expiresInMs > 0)) return;
    const expiresAt = Date.now() + expiresInMs;
    const ahead = Math.min(60_000, Math.max(1_000, expiresInMs / 4));
    this.#refreshTimer = setTimeout(() => void this.#refreshToken(ws, expiresAt), Math.max(0, expiresInMs - ahead));
  }

  async #refreshToken(ws: WebSocketLike, expiresAt: number): Promise<void> {
    const source = this.#o.token;
    if (ws !== this.#ws || typeof source !== "function") return;
    try {
      const token = await source();
      if (ws !== this.#ws) return;
      const ack = await this.request({ type: "auth.refresh", token });
      const next = ack.token_expires_at ?? 0;
      if (ws !== this.#ws || next <= this.#tokenExpiresAt) return; // nothing later to be had
      this.#tokenExpiresAt = next;
      this.#scheduleRefresh(ws, ack.token_expires_in_ms ?? undefined);
    } catch (e) {
      if (ws !== this.#ws) return;
      // Try again while there is time; at the expiry the server closes and the reconnect asks
      // the token function anew.
      const left = expiresAt - Date.now();
      if (left > 500) {
        this.#o.hooks.error(e instanceof ParleyError ? e : new ParleyError({ code: "token_missing", message: `token refresh failed: ${String(e)}`, cause: e }));
        this.#refreshTimer = setTimeout(() => void this.#refreshToken(ws, expiresAt), Math.max(250, left / 4));
      }
    }
  }

  // ---- frame budget ----

  #enqueueFrame(frame: object): void {
    this.#outQueue.push(JSON.stringify(frame));
    this.#flushFrames();
  }

  #flushFrames(): void {
    const ws = this.#ws;
    if (!ws || ws.readyState !== WS_OPEN) return;
    const now = Date.now();
    this.#tokens = Math.min(this.#burst, this.#tokens + (now - this.#tokensAt) * this.#ratePerMs);
    this.#tokensAt = now;
    while (this.#outQueue.length > 0 && this.#tokens >= 1) {
      this.#tokens -= 1;
      ws.send(this.#outQueue.shift() as string);
    }
    if (this.#outQueue.length > 0 && this.#outTimer === undefined) {
      const wait = Math.max(1, Math.ceil((1 - this.#tokens) / this.#ratePerMs));
      this.#outTimer = setTimeout(() => {
        this.#outTimer = undefined;
        this.#flushFrames();
      }, wait);
    }
  }

  /** The server refused a frame: spend the budget so nothing more goes out for `ms`. */
  #pauseFrames(ms: number): void {
    this.#tokens = Math.min(this.#tokens, 1 - ms * this.#ratePerMs);
    this.#tokensAt = Date.now();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
