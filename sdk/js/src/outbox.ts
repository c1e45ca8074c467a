//! The outbox: messages the application sent that the server has not acknowledged yet (pure).
//!
//! Entries keep their `client_msg_id` for their whole life, so a resend after a reconnect is the
//! same request to the server, which returns the original message instead of storing a copy.
//! Per channel the outbox sends one message at a time, in the order of `send()`: the server
//! commits concurrent sends of one connection in any order, so a pipeline would reorder them.

export interface OutboxEntry {
  readonly clientMsgId: string;
  readonly channelId: string;
  readonly text: string;
  readonly metadata?: unknown;
  /** Sends so far (a resend after a reconnect or a retryable error counts). */
  attempts: number;
  /** `sending` while a frame is on the wire without an answer. */
  state: "queued" | "sending";
  /** Not sent again before this time (ms since epoch), after `rate_limited` or `unavailable`. */
  notBefore: number;
}

export class Outbox {
  /** Per channel, in send order; the head is the one sent next (or in flight). */
  readonly #channels = new Map<string, OutboxEntry[]>();
  readonly #byId = new Map<string, OutboxEntry>();

  get size(): number {
    return this.#byId.size;
  }

  has(clientMsgId: string): boolean {
    return this.#byId.has(clientMsgId);
  }

  get(clientMsgId: string): OutboxEntry | undefined {
    return this.#byId.get(clientMsgId);
  }

  /** Every entry not yet acknowledged, per channel in send order. */
  pending(): readonly OutboxEntry[] {
    return [...this.#channels.values()].flat();
  }

  add(entry: { clientMsgId: string; channelId: string; text: string; metadata?: unknown }): OutboxEntry {
    if (this.#byId.has(entry.clientMsgId)) {
      throw new Error(`outbox: client_msg_id ${entry.clientMsgId} is already pending`);
    }
    const full: OutboxEntry = { ...entry, attempts: 0, state: "queued", notBefore: 0 };
    this.#byId.set(full.clientMsgId, full);
    const queue = this.#channels.get(full.channelId);
    if (queue) queue.push(full);
    else this.#channels.set(full.channelId, [full]);
    return full;
  }

  /** The entries to send at `now`: each channel's head, if it is queued and due. */
  ready(now: number): OutboxEntry[] {
    const out: OutboxEntry[] = [];
    for (const queue of this.#channels.values()) {
      const head = queue[0];
      if (head && head.state === "queued" && head.notBefore <= now) out.push(head);
    }
    return out;
  }

  /** The earliest `notBefore` of a queued head in the future, if any (to set a timer). */
  nextDue(now: number): number | undefined {
    let due: number | undefined;
    for (const queue of this.#channels.values()) {
      const head = queue[0];
      if (head && head.state === "queued" && head.notBefore > now) {
        due = due === undefined ? head.notBefore : Math.min(due, head.notBefore);
      }
    }
    return due;
  }

  markSending(clientMsgId: string): void {
    const entry = this.#byId.get(clientMsgId);
    if (!entry) return;
    entry.state = "sending";
    entry.attempts += 1;
  }

  /** Back in the queue (connection lost, or a retryable error), not before `notBefore`. */
  requeue(clientMsgId: string, notBefore = 0): void {
    const entry = this.#byId.get(clientMsgId);
    if (!entry) return;
    entry.state = "queued";
    entry.notBefore = notBefore;
  }

  /** Every entry on the wire goes back to the queue (the connection dropped). */
  requeueAll(): void {
    for (const entry of this.#byId.values()) entry.state = "queued";
  }

  /** Acknowledged, or failed for good: out of the outbox. */
  remove(clientMsgId: string): OutboxEntry | undefined {
    const entry = this.#byId.get(clientMsgId);
    if (!entry) return undefined;
    this.#byId.delete(clientMsgId);
    const queue = this.#channels.get(entry.channelId);
    if (queue) {
      const i = queue.indexOf(entry);
      if (i >= 0) queue.splice(i, 1);
      if (queue.length === 0) this.#channels.delete(entry.channelId);
    }
    return entry;
  }
}

/** A fresh idempotency key (a random UUID; at most 64 characters as the server requires). */
export function newClientMsgId(): string {
  const c = globalThis.crypto;
  if (typeof c?.randomUUID === "function") return c.randomUUID();
  const bytes = new Uint8Array(16);
  c.getRandomValues(bytes);
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}
