//! Per-channel ordering, dedupe and gap detection (pure: no IO, no timers).
//!
//! A `ChannelSequencer` receives a channel's events as they arrive (live, replayed by `resume`, or
//! out of order after a fault) and hands them on exactly once, in strictly increasing `seq`. When
//! it sees a hole — an event further ahead than the next seq, or a server statement that
//! everything up to some seq will not arrive live (a subscribe ack, a refused resume) — it asks
//! for the hole to be filled (`gap()`), and takes the pages back with `applyEvents` (pages of
//! `GET /v1/channels/{id}/events`, which hold every persisted event: the hole is filled exactly)
//! or `applyHistory` (pages of message history: the seqs of other events inside the hole, such as
//! edits, membership and calls, cannot be recovered from it and are counted as `unrecoverable`).
import type { ChannelEvent, Message } from "./types.js";

/** A channel event as the SDK delivers it. */
export type DeliveredEvent = ChannelEvent & {
  /** Set when the event was read from storage to fill a gap, rather than received live. */
  readonly fromHistory?: true;
};

/** A hole to fill: fetch events (or history) with `after`, keep those up to `through` (inclusive). */
export interface Gap {
  after: number;
  through: number;
}

/** The outcome of one page of events or history. */
export interface HistoryOutcome {
  events: DeliveredEvent[];
  /** Seqs of the range the page did not hold (with history: other events), skipped for good. */
  unrecoverable: number;
}

const REMEMBERED_MESSAGE_IDS = 4096;

export class ChannelSequencer {
  readonly channelId: string;
  /** Highest seq handed on; undefined until the subscription's starting point is known. */
  #delivered: number | undefined;
  /** Events up to this seq will not come live: they must come from a replay or from history. */
  #liveAfter = 0;
  /** Events that arrived ahead of `delivered + 1`, by seq. */
  readonly #ahead = new Map<number, DeliveredEvent>();
  /** Ids of recently delivered messages (a second copy under another seq is dropped). */
  readonly #messageIds = new Set<string>();
  #duplicates = 0;

  constructor(channelId: string, delivered?: number) {
    this.channelId = channelId;
    this.#delivered = delivered;
  }

  /** Highest seq delivered so far (the `seq` to resume from). */
  get delivered(): number | undefined {
    return this.#delivered;
  }

  /** Events dropped as copies of delivered ones. */
  get duplicates(): number {
    return this.#duplicates;
  }

  /** Events held back while a hole before them is filled. */
  get heldBack(): number {
    return this.#ahead.size;
  }

  /**
   * The server delivers live events after `seq` (subscribe ack, resume ack). If nothing was
   * delivered yet, delivery starts after `seq`; otherwise the events up to `seq` must come from
   * history (see `gap()`). Returns the held-back events this releases.
   */
  liveAfter(seq: number): DeliveredEvent[] {
    if (this.#delivered === undefined) this.#delivered = seq;
    this.#liveAfter = Math.max(this.#liveAfter, seq);
    for (const s of this.#ahead.keys()) if (s <= this.#delivered) this.#ahead.delete(s);
    return this.#drain();
  }

  /** A live or replayed event; returns what can be delivered now, in order. */
  push(event: ChannelEvent): DeliveredEvent[] {
    if (this.#delivered !== undefined && event.seq <= this.#delivered) {
      this.#duplicates += 1;
      return [];
    }
    if (this.#ahead.has(event.seq)) {
      this.#duplicates += 1;
      return [];
    }
    this.#ahead.set(event.seq, event);
    return this.#drain();
  }

  /** The hole to fill from history now, or null when there is none. */
  gap(): Gap | null {
    if (this.#delivered === undefined) return null;
    let through = this.#liveAfter;
    if (this.#ahead.size > 0) through = Math.max(through, Math.min(...this.#ahead.keys()) - 1);
    return through > this.#delivered ? { after: this.#delivered, through } : null;
  }

  /**
   * A page of events fetched for `gap` (`GET …/events?after=gap.after`), ascending, with the
   * page's `has_more`. Delivers the events of the hole in order and moves past it when the page
   * reaches its end. The events endpoint holds every persisted event, so nothing of the hole is
   * lost (a seq it lacks is counted as `unrecoverable`; the server never leaves one).
   */
  applyEvents(gap: Gap, events: readonly ChannelEvent[], hasMore: boolean): HistoryOutcome {
    return this.#applyPage(gap, events, hasMore);
  }

  /**
   * A page of history fetched for `gap` (`?after=gap.after`), ascending, with the page's
   * `has_after`. Delivers the messages of the hole in order and moves past it when the page
   * reaches its end; the other events of the hole are counted as `unrecoverable`.
   */
  applyHistory(gap: Gap, messages: readonly Message[], hasAfter: boolean): HistoryOutcome {
    const events = messages.map(
      (message): ChannelEvent => ({ type: "message.new", channel_id: this.channelId, seq: message.seq, message }),
    );
    return this.#applyPage(gap, events, hasAfter);
  }

  #applyPage(gap: Gap, page: readonly ChannelEvent[], hasMore: boolean): HistoryOutcome {
    const start = this.#delivered;
    if (start === undefined) return { events: [], unrecoverable: 0 };
    let lastSeq = gap.after;
    for (const event of page) {
      lastSeq = Math.max(lastSeq, event.seq);
      if (event.seq <= start || event.seq > gap.through || this.#ahead.has(event.seq)) continue;
      this.#ahead.set(event.seq, { ...event, fromHistory: true as const });
    }
    // Pages have no holes of their own: up to the last event of the page (or up to the end of
    // the hole when the page reached the end), every seq the page lacks will not come.
    const reached = !hasMore || lastSeq >= gap.through ? gap.through : lastSeq;
    const events: DeliveredEvent[] = [];
    let unrecoverable = 0;
    for (let seq = start + 1; seq <= reached; seq++) {
      const held = this.#ahead.get(seq);
      if (held) {
        this.#ahead.delete(seq);
        const out = this.#accept(held);
        if (out) events.push(out);
      } else {
        unrecoverable += 1;
      }
      this.#delivered = seq;
    }
    events.push(...this.#drain());
    return { events, unrecoverable };
  }

  #drain(): DeliveredEvent[] {
    const out: DeliveredEvent[] = [];
    if (this.#delivered === undefined) return out;
    for (;;) {
      const next = this.#ahead.get(this.#delivered + 1);
      if (!next) break;
      this.#ahead.delete(next.seq);
      this.#delivered = next.seq;
      const event = this.#accept(next);
      if (event) out.push(event);
    }
    return out;
  }

  /** Drops a second copy of a message already delivered under another seq. */
  #accept(event: DeliveredEvent): DeliveredEvent | null {
    if (event.type !== "message.new") return event;
    const id = event.message.id;
    if (this.#messageIds.has(id)) {
      this.#duplicates += 1;
      return null;
    }
    this.#messageIds.add(id);
    if (this.#messageIds.size > REMEMBERED_MESSAGE_IDS) {
      const oldest = this.#messageIds.values().next().value;
      if (oldest !== undefined) this.#messageIds.delete(oldest);
    }
    return event;
  }
}
