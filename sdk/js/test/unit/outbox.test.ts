/** The outbox keeps unacknowledged messages, one in flight per channel, in send order. */
import { describe, expect, it } from "vitest";
import { newClientMsgId, Outbox } from "../../src/outbox.js";

const add = (o: Outbox, id: string, channelId = "a") => o.add({ clientMsgId: id, channelId, text: id });
const ids = (entries: { clientMsgId: string }[]) => entries.map((e) => e.clientMsgId);

describe("Outbox", () => {
  it("sends one message at a time per channel, in order, channels independently", () => {
    const o = new Outbox();
    add(o, "a1");
    add(o, "a2");
    add(o, "b1", "b");
    expect(ids(o.ready(0))).toEqual(["a1", "b1"]);
    o.markSending("a1");
    o.markSending("b1");
    expect(o.ready(0)).toEqual([]);
    o.remove("a1");
    expect(ids(o.ready(0))).toEqual(["a2"]);
  });

  it("keeps an entry and its key across a lost connection, and counts attempts", () => {
    const o = new Outbox();
    add(o, "k");
    o.markSending("k");
    o.requeueAll();
    const [entry] = o.ready(0);
    expect(entry?.clientMsgId).toBe("k");
    o.markSending("k");
    expect(o.get("k")?.attempts).toBe(2);
  });

  it("holds a rate-limited entry until its time, and says when", () => {
    const o = new Outbox();
    add(o, "k");
    o.markSending("k");
    o.requeue("k", 1_000);
    expect(o.ready(500)).toEqual([]);
    expect(o.nextDue(500)).toBe(1_000);
    expect(ids(o.ready(1_000))).toEqual(["k"]);
  });

  it("refuses a key that is already pending", () => {
    const o = new Outbox();
    add(o, "k");
    expect(() => add(o, "k")).toThrow(/already pending/);
  });

  it("lists pending entries and forgets removed ones", () => {
    const o = new Outbox();
    add(o, "1");
    add(o, "2");
    o.remove("1");
    expect(ids([...o.pending()])).toEqual(["2"]);
    expect(o.size).toBe(1);
    expect(o.remove("nope")).toBeUndefined();
  });

  it("generates distinct keys the server accepts (1–64 characters)", () => {
    const keys = new Set(Array.from({ length: 1_000 }, newClientMsgId));
    expect(keys.size).toBe(1_000);
    for (const k of keys) expect(k.length).toBeLessThanOrEqual(64);
  });
});
