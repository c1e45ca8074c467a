/**
 * Real socket faults between the SDK and the server (a TCP proxy the test resets with RST at
 * random moments, or takes down): nothing is lost, nothing is doubled, order holds.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { OutboxRecord, ParleyClient } from "../../src/index.js";
import { EventLog, clientFor } from "../helpers/clients.js";
import { TcpProxy } from "../helpers/proxy.js";
import { startServer, type TestServer } from "../helpers/server.js";
import { sleep, waitUntil, within } from "../helpers/wait.js";

let server: TestServer;
const cleanup: Array<() => unknown> = [];

beforeAll(async () => {
  server = await startServer([
    // A budget that lets 1,000 sends through quickly (the SDK paces itself to whatever the welcome says).
    "--ws-frames-per-second",
    "2000",
    "--ws-frame-burst",
    "2000",
    // Short replays, so some resumes are refused as too_far_behind and filled from history.
    "--max-replay",
    "25",
  ]);
});

afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

afterAll(async () => {
  await server?.stop();
});

async function channelWithBob(name: string): Promise<string> {
  const alice = await clientFor(server, "alice");
  const channel = await alice.rest.createChannel({ kind: "channel", name, members: ["bob"] });
  alice.close();
  return channel.id;
}

async function proxied(user: string): Promise<{ client: ParleyClient; proxy: TcpProxy }> {
  const proxy = new TcpProxy(server.port);
  await proxy.up();
  const client = await clientFor(server, user, { url: proxy.url, backoff: { initialMs: 20, maxMs: 300 } });
  cleanup.push(() => client.close(), () => proxy.down());
  return { client, proxy };
}

/** Every message of a channel from history (ascending). */
async function storedTexts(client: ParleyClient, channelId: string): Promise<string[]> {
  const out: string[] = [];
  let after = 0;
  for (;;) {
    const page = await client.rest.history(channelId, { after, limit: 200 });
    out.push(...page.messages.map((m) => m.text));
    const last = page.messages.at(-1);
    if (!page.has_after || !last) return out;
    after = last.seq;
  }
}

describe("faults", () => {
  it("1,000 sends with both connections cut at random moments arrive exactly once, in order", async () => {
    const channelId = await channelWithBob("chaos");
    const sender = await proxied("alice");
    const receiver = await proxied("bob");
    const log = new EventLog(receiver.client);
    let resyncs = 0;
    receiver.client.on("resync", () => (resyncs += 1));
    await within("both connected", 10_000, Promise.all([sender.client.connect(), receiver.client.connect()]));
    await receiver.client.subscribe(channelId);

    const N = 1_000;
    const expected = Array.from({ length: N }, (_, i) => `m-${i}`);
    const sends = expected.map((text) => sender.client.send(channelId, text));

    // Cut one of the two links (or both) every 30–250 ms until every send is acknowledged.
    let done = false;
    const all = Promise.all(sends).finally(() => (done = true));
    const chaos = (async () => {
      let cuts = 0;
      while (!done) {
        await sleep(30 + Math.random() * 220);
        if (done) break;
        const r = Math.random();
        if (r < 0.4) sender.proxy.reset();
        else if (r < 0.8) receiver.proxy.reset();
        else {
          sender.proxy.reset();
          receiver.proxy.reset();
        }
        cuts += 1;
      }
      return cuts;
    })();
    const results = await within(`all ${N} sends acknowledged`, 90_000, all);
    const cuts = await chaos;
    expect(cuts, "the proxies cut connections during the sends").toBeGreaterThan(3);

    await waitUntil(`the receiver has ${N} messages`, () => log.texts(channelId).length >= N, {
      timeoutMs: 30_000,
      detail: () => `has ${log.texts(channelId).length}, state ${receiver.client.connection.state}`,
    });
    const received = log.texts(channelId);
    expect(received.length, "no duplicates on the receiver").toBe(N);
    expect(received, "every message once, in send order").toEqual(expected);
    const seqs = log.of(channelId).map((e) => e.seq);
    expect(seqs.every((s, i) => i === 0 || s > (seqs[i - 1] ?? 0)), "seqs strictly increase").toBe(true);
    expect(new Set(results.map((r) => r.message.id)).size, "one message id per send").toBe(N);
    expect(await storedTexts(sender.client, channelId), "the server stored each message once").toEqual(expected);
    console.info(
      `faults: ${cuts} cut rounds, sender reconnects ${sender.proxy.accepted - 1}, receiver reconnects ${receiver.proxy.accepted - 1}, history fills ${resyncs}`,
    );
  });

  it("messages sent while the server is unreachable are sent once it is back, exactly once", async () => {
    const channelId = await channelWithBob("offline");
    const sender = await proxied("alice");
    const bob = await clientFor(server, "bob");
    cleanup.push(() => bob.close());
    const log = new EventLog(bob);
    await Promise.all([sender.client.connect(), bob.connect()]);
    await bob.subscribe(channelId);

    await sender.proxy.down();
    await waitUntil("the sender notices the drop", () => sender.client.connection.state === "reconnecting", {
      detail: () => sender.client.connection.state,
    });
    const sends = ["offline 1", "offline 2", "offline 3"].map((t) => sender.client.send(channelId, t));
    await sleep(300); // several refused reconnect attempts
    expect(sender.client.pendingMessages().map((m) => m.text), "queued in the outbox").toEqual([
      "offline 1",
      "offline 2",
      "offline 3",
    ]);
    expect(await storedTexts(bob, channelId), "nothing reached the server yet").toEqual([]);

    await sender.proxy.up();
    const results = await within("the outbox drained", 15_000, Promise.all(sends));
    expect(results.every((r) => r.created)).toBe(true);
    await waitUntil("bob has the three messages", () => log.texts(channelId).length >= 3, {
      detail: () => log.texts(channelId).join(","),
    });
    await sleep(200);
    expect(log.texts(channelId)).toEqual(["offline 1", "offline 2", "offline 3"]);
    expect(await storedTexts(bob, channelId)).toEqual(["offline 1", "offline 2", "offline 3"]);
    expect(sender.client.pendingMessages()).toHaveLength(0);
  });

  it("an outbox kept in a store outlives its client: the next client sends it, once", async () => {
    const channelId = await channelWithBob("stored-outbox");
    let records: OutboxRecord[] = [];
    const store = { load: () => records, save: (r: OutboxRecord[]) => (records = r) };
    const first = await proxied("alice");
    await first.proxy.down(); // the first client never gets through
    const firstClient = await clientFor(server, "alice", { url: first.proxy.url, outboxStore: store, backoff: { initialMs: 20, maxMs: 100 } });
    cleanup.push(() => firstClient.close());
    void firstClient.connect().catch(() => {});
    const lost = ["kept 1", "kept 2"].map((t) => firstClient.send(channelId, t).catch((e: unknown) => e));
    expect(records.map((r) => r.text), "saved as they are queued").toEqual(["kept 1", "kept 2"]);
    firstClient.close();
    expect((await Promise.all(lost)).map((e) => (e as { code?: string }).code)).toEqual(["closed", "closed"]);
    expect(records, "closing keeps the store").toHaveLength(2);

    const next = await clientFor(server, "alice", { outboxStore: store });
    cleanup.push(() => next.close());
    const sent: string[] = [];
    next.on("outbox.sent", (e) => sent.push(e.result.message.text));
    expect(next.pendingMessages().map((m) => m.text), "restored from the store").toEqual(["kept 1", "kept 2"]);
    await next.connect();
    await waitUntil("the restored messages were sent", () => sent.length === 2, { detail: () => sent.join(",") });
    expect(sent).toEqual(["kept 1", "kept 2"]);
    expect(records, "the store is empty once sent").toEqual([]);
    expect(await storedTexts(next, channelId)).toEqual(["kept 1", "kept 2"]);
  });

  it("a message whose acknowledgement was lost is resent and stored once", async () => {
    const channelId = await channelWithBob("lost-ack");
    const sender = await proxied("alice");
    await sender.client.connect();
    const direct = await clientFor(server, "alice"); // REST straight to the server, not through the proxy
    let committed = false;
    const poll = setInterval(() => {
      storedTexts(direct, channelId).then(
        (t) => (committed = t.length > 0),
        () => {},
      );
    }, 20);
    cleanup.push(() => clearInterval(poll));
    // The server's answers stop reaching the SDK: the send is committed, its ack is lost.
    sender.proxy.muteDownstream();
    const sent = sender.client.send(channelId, "ack lost");
    await waitUntil("the server committed the message", () => committed, { detail: () => "not in history yet" });
    expect(sender.client.pendingMessages().map((m) => m.text), "still unacknowledged").toEqual(["ack lost"]);
    sender.proxy.reset();
    const result = await within("the resent message's ack", 10_000, sent);
    expect(result.created, "the resend returned the original message").toBe(false);
    expect(await storedTexts(sender.client, channelId)).toEqual(["ack lost"]);
  });

  it("reports its connection states across a drop and resumes the subscription", async () => {
    const channelId = await channelWithBob("states");
    const receiver = await proxied("bob");
    const alice = await clientFor(server, "alice");
    cleanup.push(() => alice.close());
    const states: string[] = [];
    receiver.client.connection.on("statechange", (c) => states.push(c.current + (c.reconnected ? "(again)" : "")));
    const log = new EventLog(receiver.client);
    await receiver.client.connect();
    await receiver.client.subscribe(channelId);
    await receiver.proxy.down();
    await waitUntil("reconnecting", () => receiver.client.connection.state === "reconnecting");
    const sent = [];
    for (let i = 0; i < 5; i++) sent.push(await alice.rest.sendMessage(channelId, { client_msg_id: `while-away-${i}`, text: `away ${i}` }));
    // A read position set while offline is sent once the connection is back.
    const lastSeq = sent.at(-1)!.message.seq;
    const read = receiver.client.markRead(channelId, lastSeq);
    await receiver.proxy.up();
    expect(await within("the offline read position's ack", 10_000, read)).toBe(lastSeq);
    expect((await alice.rest.listMembers(channelId)).members.find((m) => m.user_id === "bob")?.last_read_seq).toBe(lastSeq);
    await within("connected again", 10_000, receiver.client.connection.waitFor("connected"));
    await waitUntil("the missed messages were replayed", () => log.texts(channelId).length === 5, {
      detail: () => log.texts(channelId).join(","),
    });
    expect(log.texts(channelId)).toEqual(["away 0", "away 1", "away 2", "away 3", "away 4"]);
    expect(states[0]).toBe("connecting");
    expect(states[1]).toBe("connected");
    expect(states).toContain("reconnecting");
    expect(states.at(-1)).toBe("connected(again)");
  });
});
