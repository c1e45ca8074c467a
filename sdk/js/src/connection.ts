//! The visible state of the realtime connection, and the WebSocket seam.
import { Emitter } from "./emitter.js";
import type { ParleyError } from "./errors.js";
import type { WelcomeFrame } from "./types.js";

/**
 * - `disconnected`: not connected and not trying (before `connect()`, after `close()`, or after a
 *   fatal error such as a refused token that cannot be refreshed).
 * - `connecting`: the first connection attempt of a `connect()`.
 * - `connected`: authenticated, and every subscription resumed or re-subscribed.
 * - `reconnecting`: the connection dropped; waiting `retryInMs`, then trying again.
 */
export type ConnectionState = "disconnected" | "connecting" | "connected" | "reconnecting";

export interface ConnectionStateChange {
  previous: ConnectionState;
  current: ConnectionState;
  /** Why, for people: a close code and reason, a network error, `closed by the application`. */
  reason?: string;
  /** The error that caused it, if any (a refused token, a server error frame). */
  error?: ParleyError;
  /** For `reconnecting`: how long until the next attempt. */
  retryInMs?: number;
  /** For `connected`: whether this follows an earlier connection of this client (a reconnect). */
  reconnected?: boolean;
}

export type ConnectionEvents = {
  statechange: ConnectionStateChange;
} & { [S in ConnectionState]: ConnectionStateChange };

/** `client.connection`: the state, its changes as events, and what the server said at welcome. */
export class Connection extends Emitter<ConnectionEvents> {
  #state: ConnectionState = "disconnected";
  #welcome: WelcomeFrame | undefined;
  #attempts = 0;
  #url: string | undefined;

  get state(): ConnectionState {
    return this.#state;
  }

  /** The welcome frame of the current (or last) connection: session id, heartbeat, limits. */
  get welcome(): WelcomeFrame | undefined {
    return this.#welcome;
  }

  /** The server's session id of the current (or last) connection. */
  get sessionId(): string | undefined {
    return this.#welcome?.session_id;
  }

  /**
   * The base URL of the current (or last, or being attempted) connection: with several
   * addresses, which one the client is on.
   */
  get url(): string | undefined {
    return this.#url;
  }

  /** Connection attempts since the last time the state was `connected`. */
  get attempts(): number {
    return this.#attempts;
  }

  /** Resolves when the state is `state` (at once if it is), rejects after `timeoutMs`. */
  waitFor(state: ConnectionState, timeoutMs = 30_000): Promise<void> {
    if (this.#state === state) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        off();
        reject(new Error(`connection: not ${state} within ${timeoutMs} ms (state ${this.#state})`));
      }, timeoutMs);
      const off = this.on(state, () => {
        clearTimeout(timer);
        off();
        resolve();
      });
    });
  }

  /** @internal Used by the client. */
  _setWelcome(welcome: WelcomeFrame): void {
    this.#welcome = welcome;
  }

  /** @internal Used by the client. */
  _setUrl(url: string): void {
    this.#url = url;
  }

  /** @internal Used by the client. */
  _attempt(): void {
    this.#attempts += 1;
  }

  /** @internal Used by the client. */
  _transition(current: ConnectionState, detail: Omit<ConnectionStateChange, "previous" | "current"> = {}): void {
    const previous = this.#state;
    if (previous === current && current !== "reconnecting") return;
    this.#state = current;
    if (current === "connected") this.#attempts = 0;
    const change: ConnectionStateChange = { previous, current, ...detail };
    this.emit("statechange", change);
    this.emit(current, change);
  }
}

/**
 * A WebSocket constructor: the browser's `WebSocket`, or `WebSocket` from the `ws` package in
 * Node. Called as `new WebSocket(url, ["parley.v1"])`; the instance must have `send`, `close`,
 * `readyState` and the `onopen`/`onmessage`/`onclose`/`onerror` handler properties.
 */
export type WebSocketConstructor = new (url: string, protocols: string[]) => unknown;

/** What the client uses of a WebSocket instance. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** `ws` only: drop the socket at once, without a closing handshake. */
  terminate?: () => void;
}

export const WS_OPEN = 1;
