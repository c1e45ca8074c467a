//! Typing indicators: your own (debounced start/stop) and other people's (with the expiry the
//! server states).
import type { TypingEvent } from "./types.js";

export interface TypingOptions {
  /** After this long without `keystroke()`, a `typing.stop` is sent. Default 4 s. */
  idleMs?: number;
}

/** How the helper talks to the client (kept small so it can be tested alone). */
export interface TypingTransport {
  /** Sends `typing.start` or `typing.stop`; failures are ignored (typing is ephemeral). */
  send(channelId: string, state: "start" | "stop"): void;
  /** Least interval between two starts (the welcome's `limits.typing_throttle_ms`). */
  throttleMs(): number;
  now(): number;
}

/** `client.typing`. */
export class Typing {
  readonly #transport: TypingTransport;
  readonly #idleMs: number;
  /** Own typing per channel: when the last start was sent, and the stop timer. */
  readonly #mine = new Map<string, { lastStart: number; idle: ReturnType<typeof setTimeout> }>();
  /** Others typing: channel → user → expiry timer. */
  readonly #others = new Map<string, Map<string, ReturnType<typeof setTimeout>>>();
  readonly #onChange: (channelId: string) => void;

  constructor(transport: TypingTransport, options: TypingOptions = {}, onChange: (channelId: string) => void = () => {}) {
    this.#transport = transport;
    this.#idleMs = options.idleMs ?? 4_000;
    this.#onChange = onChange;
  }

  /**
   * Call on every keystroke in a channel's composer. Sends `typing.start` at most once per
   * throttle interval, and `typing.stop` once the keystrokes stop for `idleMs`.
   */
  keystroke(channelId: string): void {
    const now = this.#transport.now();
    const mine = this.#mine.get(channelId);
    if (mine) clearTimeout(mine.idle);
    const due = !mine || now - mine.lastStart >= this.#transport.throttleMs();
    if (due) this.#transport.send(channelId, "start");
    this.#mine.set(channelId, {
      lastStart: due ? now : (mine?.lastStart ?? now),
      idle: setTimeout(() => this.stop(channelId), this.#idleMs),
    });
  }

  /** Stops your indicator now (call when the composer is cleared). Sending a message also stops it. */
  stop(channelId: string): void {
    const mine = this.#mine.get(channelId);
    if (!mine) return;
    clearTimeout(mine.idle);
    this.#mine.delete(channelId);
    this.#transport.send(channelId, "stop");
  }

  /** Forgets your indicator without telling the server (a sent message stopped it there). */
  reset(channelId: string): void {
    const mine = this.#mine.get(channelId);
    if (!mine) return;
    clearTimeout(mine.idle);
    this.#mine.delete(channelId);
  }

  /** Users typing in a channel now (other than you). */
  users(channelId: string): string[] {
    return [...(this.#others.get(channelId)?.keys() ?? [])];
  }

  /** @internal A `typing` event from the server. */
  _onEvent(event: TypingEvent): void {
    if (event.state === "start") this.#set(event.channel_id, event.user_id, event.expires_in_ms ?? 6_000);
    else this.#clear(event.channel_id, event.user_id);
  }

  /** @internal A message from `userId` ends their indicator. */
  _onMessage(channelId: string, userId: string): void {
    this.#clear(channelId, userId);
  }

  /** @internal Drops every timer (client closed). */
  _dispose(): void {
    for (const mine of this.#mine.values()) clearTimeout(mine.idle);
    this.#mine.clear();
    for (const users of this.#others.values()) for (const timer of users.values()) clearTimeout(timer);
    this.#others.clear();
  }

  #set(channelId: string, userId: string, expiresInMs: number): void {
    let users = this.#others.get(channelId);
    if (!users) {
      users = new Map();
      this.#others.set(channelId, users);
    }
    const old = users.get(userId);
    if (old) clearTimeout(old);
    users.set(userId, setTimeout(() => this.#clear(channelId, userId), expiresInMs));
    if (!old) this.#onChange(channelId);
  }

  #clear(channelId: string, userId: string): void {
    const users = this.#others.get(channelId);
    const timer = users?.get(userId);
    if (!users || timer === undefined) return;
    clearTimeout(timer);
    users.delete(userId);
    if (users.size === 0) this.#others.delete(channelId);
    this.#onChange(channelId);
  }
}
