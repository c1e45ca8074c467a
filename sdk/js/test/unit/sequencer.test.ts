/** Per-channel order, dedupe and gap detection, as a pure state machine. */
import { describe, expect, it } from "vitest";
import { ChannelSequencer } from "../../src/sequencer.js";
import type { ChannelEvent, Message } from "../../src/types.js";

const CH = "ch_test";

function message(seq: number, text = `m${seq}`): Message {
  return {
    id: `msg_${seq}`,
    channel_id: CH,
    seq,
    sender_id: "alice",
    client_msg_id: `c${seq}`,
    text,
    created_at: "2026-11-28T10:00:00.000Z",
    deleted: false,
  };
}

function newEvent(seq: number): ChannelEvent {
  return { type: "message.new", channel_id: CH, seq, message: message(seq) };
}

function memberEvent(seq: number): ChannelEvent {
  return { type: "member.removed", channel_id: CH, seq, user_id: "carol", by: "alice" };
}

const seqs = (events: { seq: number }[]) => events.map((e) => e.seq);

describe("ChannelSequencer", () => {
  it("holds events until the subscription's live point is known, then starts after it", () => {
    const s = new ChannelSequencer(CH);
    expect(s.push(newEvent(6))).toEqual([]);
    expect(s.push(newEvent(5))).toEqual([]);
    expect(seqs(s.liveAfter(4))).toEqual([5, 6]);
    expect(s.gap()).toBeNull();
  });

  it("delivers contiguous events in order and drops copies by seq", () => {
    const s = new ChannelSequencer(CH, 0);
    expect(seqs(s.push(newEvent(1)))).toEqual([1]);
    expect(seqs(s.push(newEvent(2)))).toEqual([2]);
    expect(s.push(newEvent(2))).toEqual([]);
    expect(s.push(newEvent(1))).toEqual([]);
    expect(s.duplicates).toBe(2);
    expect(s.delivered).toBe(2);
  });

  it("drops a second copy of a message id under another seq", () => {
    const s = new ChannelSequencer(CH, 0);
    s.push(newEvent(1));
    const copy: ChannelEvent = { type: "message.new", channel_id: CH, seq: 2, message: { ...message(1), seq: 2 } };
    expect(s.push(copy)).toEqual([]);
    expect(s.delivered).toBe(2);
  });

  it("detects a gap in live events, holds what came after it, and asks for history", () => {
    const s = new ChannelSequencer(CH, 3);
    expect(s.push(newEvent(7))).toEqual([]);
    expect(s.push(newEvent(8))).toEqual([]);
    expect(s.heldBack).toBe(2);
    expect(s.gap()).toEqual({ after: 3, through: 6 });
  });

  it("fills a gap from history, then releases the held events, in order", () => {
    const s = new ChannelSequencer(CH, 3);
    s.push(newEvent(7));
    const gap = s.gap()!;
    // History has messages 4 and 6; seq 5 was another kind of event (e.g. a member change).
    const out = s.applyHistory(gap, [message(4), message(6), message(7)], false);
    expect(seqs(out.events)).toEqual([4, 6, 7]);
    expect(out.events[0]).toMatchObject({ fromHistory: true });
    expect(out.events[2]).not.toHaveProperty("fromHistory");
    expect(out.unrecoverable).toBe(1);
    expect(s.delivered).toBe(7);
    expect(s.gap()).toBeNull();
  });

  it("fills a gap exactly from a page of events: other events too, nothing unrecoverable", () => {
    const s = new ChannelSequencer(CH, 3);
    s.push(newEvent(8));
    const gap = s.gap()!;
    expect(gap).toEqual({ after: 3, through: 7 });
    // Two pages, as `GET …/events?after=` returns them (`has_more` on the first).
    const first = s.applyEvents(gap, [newEvent(4), memberEvent(5)], true);
    expect(seqs(first.events)).toEqual([4, 5]);
    expect(first.events.every((e) => e.fromHistory === true)).toBe(true);
    expect(s.gap()).toEqual({ after: 5, through: 7 });
    const second = s.applyEvents(s.gap()!, [memberEvent(6), newEvent(7), newEvent(8)], false);
    expect(seqs(second.events)).toEqual([6, 7, 8]);
    expect(second.events.map((e) => e.type)).toEqual(["member.removed", "message.new", "message.new"]);
    expect(second.events[2]).not.toHaveProperty("fromHistory"); // 8 came live
    expect(first.unrecoverable + second.unrecoverable).toBe(0);
    expect(s.delivered).toBe(8);
    expect(s.gap()).toBeNull();
  });

  it("fills a long gap page by page", () => {
    const s = new ChannelSequencer(CH, 0);
    s.liveAfter(500);
    let gap = s.gap()!;
    expect(gap).toEqual({ after: 0, through: 500 });
    const page1 = Array.from({ length: 200 }, (_, i) => message(i + 1));
    const out1 = s.applyHistory(gap, page1, true);
    expect(out1.events).toHaveLength(200);
    gap = s.gap()!;
    expect(gap).toEqual({ after: 200, through: 500 });
    const page2 = Array.from({ length: 200 }, (_, i) => message(i + 201));
    s.applyHistory(gap, page2, true);
    gap = s.gap()!;
    const page3 = Array.from({ length: 100 }, (_, i) => message(i + 401));
    const out3 = s.applyHistory(gap, page3, false);
    expect(out3.events.at(-1)?.seq).toBe(500);
    expect(s.gap()).toBeNull();
  });

  it("prefers a held live event over the history copy of the same seq", () => {
    const s = new ChannelSequencer(CH, 0);
    s.push(newEvent(2));
    s.push(memberEvent(3));
    const gap = s.gap()!;
    expect(gap).toEqual({ after: 0, through: 1 });
    const out = s.applyHistory(gap, [message(1), message(2)], true);
    expect(out.events.map((e) => [e.seq, e.type, "fromHistory" in e])).toEqual([
      [1, "message.new", true],
      [2, "message.new", false],
      [3, "member.removed", false],
    ]);
  });

  it("treats a refused resume as a gap up to the server's seq", () => {
    const s = new ChannelSequencer(CH, 10);
    s.liveAfter(15);
    expect(s.gap()).toEqual({ after: 10, through: 15 });
    s.push(newEvent(16));
    const out = s.applyHistory({ after: 10, through: 15 }, [11, 12, 13, 14, 15].map((n) => message(n)), false);
    expect(seqs(out.events)).toEqual([11, 12, 13, 14, 15, 16]);
  });

  it("ignores history messages outside the gap", () => {
    const s = new ChannelSequencer(CH, 5);
    s.push(newEvent(8));
    const out = s.applyHistory({ after: 5, through: 7 }, [message(3), message(6), message(9)], true);
    expect(seqs(out.events)).toEqual([6, 8]);
    expect(out.unrecoverable).toBe(1);
  });

  it("never delivers anything twice whatever the interleaving of live, replayed and history", () => {
    for (let round = 0; round < 200; round++) {
      const s = new ChannelSequencer(CH, 0);
      const delivered: number[] = [];
      const N = 60;
      const order = Array.from({ length: N * 2 }, (_, i) => (i % N) + 1).sort(() => Math.random() - 0.5);
      for (const seq of order) {
        delivered.push(...seqs(s.push(newEvent(seq))));
        if (Math.random() < 0.1) {
          const gap = s.gap();
          if (gap) {
            const msgs = Array.from({ length: gap.through - gap.after }, (_, i) => message(gap.after + i + 1));
            delivered.push(...seqs(s.applyHistory(gap, msgs, false).events));
          }
        }
      }
      expect(delivered).toEqual(Array.from({ length: N }, (_, i) => i + 1));
    }
  });
});
