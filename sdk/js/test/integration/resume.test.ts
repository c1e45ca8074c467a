/**
 * Resume refusals and limits, each forced on purpose: a client that missed more than
 * `max_replay` events, or came back after the resume window, still gets every message once and
 * in order (from history), and says what history could not restore. Also: the SDK paces its
 * frames to the server's budget, REST rate limits surface as typed errors, a refused static token
 * is fatal.
 */
import { afterEach, describe, expect, it } from "vitest";
import { ParleyError, RestClient, type ParleyClient, type ResyncInfo } from "../../src/index.js";
import { EventLog, clientFor } from "../helpers/clients.js";
import { TcpProxy } from "../helpers/proxy.js";
import { startServer, type TestServer } from "../helpers/server.js";
import { sleep, waitUntil, within } from "../helpers/wait.js";

const cleanup: Array<() => unknown> = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function server(flags: string[]): Promise<TestServer> {
  const s = await startServer(flags);
  cleanup.push(() => s.stop());
  return s;
}

/** Bob subscribed through a proxy, and Alice sending over REST. */
async function scene(s: TestServer) {
  const alice = await clientFor(s, "alice");
  cleanup.push(() => alice.close());
  const channel = await alice.rest.createChannel({ kind: "channel", name: "resume", members: ["bob"] });
  const proxy = new TcpProxy(s.port);
  await proxy.up();
  const bob = await clientFor(s, "bob", { url: proxy.url, backoff: { initialMs: 20, maxMs: 200 } });
  cleanup.push(() => bob.close(), () => proxy.down());
  const log = new EventLog(bob);
  const resyncs: ResyncInfo[] = [];
  bob.on("resync", (r) => resyncs.push(r));
  await bob.connect();
  await bob.subscribe(channel.id);
  return { alice, bob, proxy, log, resyncs, channelId: channel.id };
}

async function sendMany(alice: ParleyClient, channelId: string, prefix: string, n: number): Promise<string[]> {
  const texts: string[] = [];
  for (let i = 0; i < n; i++) {
    const text = `${prefix} ${i}`;
    await alice.rest.sendMessage(channelId, { client_msg_id: `${prefix}-${i}`, text });
    texts.push(text);
  }
  return texts;
}

describe("resume", () => {
  it("too far behind: the refused channel is filled from storage, once and in order", async () => {
    const s = await server(["--max-replay", "3"]);
    const { alice, bob, proxy, log, resyncs, channelId } = await scene(s);
    const before = await sendMany(alice, channelId, "live", 2);
    await waitUntil("bob has the live messages", () => log.texts(channelId).length === 2);
    await proxy.down();
    await waitUntil("bob is reconnecting", () => bob.connection.state === "reconnecting");
    const missed = await sendMany(alice, channelId, "missed", 10);
    await proxy.up();
    await waitUntil("bob has every message", () => log.texts(channelId).length === 12, {
      detail: () => `bob has ${JSON.stringify(log.texts(channelId))}`,
    });
    expect(log.texts(channelId)).toEqual([...before, ...missed]);
    expect(resyncs.reduce((n, r) => n + r.recovered, 0), "the 10 missed messages came from storage").toBe(10);
    expect(log.of(channelId).slice(2).every((e) => "fromHistory" in e && e.fromHistory)).toBe(true);
  });

  it("window passed: a client back after the resume window fetches what it missed", async () => {
    const s = await server(["--resume-window-ms", "200"]);
    const { alice, bob, proxy, log, resyncs, channelId } = await scene(s);
    await proxy.down();
    await waitUntil("bob is reconnecting", () => bob.connection.state === "reconnecting");
    const missed = await sendMany(alice, channelId, "late", 3);
    await sleep(600); // past the window
    await proxy.up();
    await waitUntil("bob has the missed messages", () => log.texts(channelId).length === 3, {
      detail: () => `bob has ${JSON.stringify(log.texts(channelId))}`,
    });
    expect(log.texts(channelId)).toEqual(missed);
    expect(resyncs.length, "a history fill happened").toBeGreaterThan(0);
  });

  it("fills a hole exactly: an edit and a member change inside it arrive as events, in order", async () => {
    const s = await server(["--max-replay", "1"]);
    const { alice, bob, proxy, log, resyncs, channelId } = await scene(s);
    const { message } = await alice.rest.sendMessage(channelId, { client_msg_id: "first", text: "first" });
    await waitUntil("bob has the first message", () => log.texts(channelId).length === 1);
    await proxy.down();
    await waitUntil("bob is reconnecting", () => bob.connection.state === "reconnecting");
    await alice.rest.editMessage(channelId, message.id, { text: "first (edited)" });
    await alice.rest.addMember(channelId, { user_id: "carol" });
    await alice.rest.sendMessage(channelId, { client_msg_id: "second", text: "second" });
    await proxy.up();
    await waitUntil("bob has the second message", () => log.texts(channelId).includes("second"), {
      detail: () => JSON.stringify(log.of(channelId).map((e) => [e.seq, e.type])),
    });
    const hole = log.of(channelId).slice(1);
    expect(hole.map((e) => [e.seq, e.type])).toEqual([
      [message.seq + 1, "message.updated"],
      [message.seq + 2, "member.added"],
      [message.seq + 3, "message.new"],
    ]);
    expect(hole.every((e) => e.fromHistory === true), "read from storage").toBe(true);
    const edit = hole[0];
    expect(edit?.type === "message.updated" && edit.message.text).toBe("first (edited)");
    const added = hole[1];
    expect(added?.type === "member.added" && added.member.user_id).toBe("carol");
    expect(resyncs.reduce((n, r) => n + r.recovered, 0)).toBe(3);
    expect(resyncs.reduce((n, r) => n + r.unrecoverable, 0), "nothing of the hole is lost").toBe(0);
    const seqs = log.of(channelId).map((e) => e.seq);
    expect(seqs.every((q, i) => i === 0 || q > (seqs[i - 1] ?? 0))).toBe(true);
    expect(bob.subscriptions().find((x) => x.channelId === channelId)?.seq).toBe(message.seq + 3);
  });
});

describe("resume over the channel cap", () => {
  it("splits a resume over several frames of at most limits.max_resume_channels: every channel is replayed, none refilled", async () => {
    const s = await server(["--ws-max-resume-channels", "3"]);
    const alice = await clientFor(s, "alice");
    cleanup.push(() => alice.close());
    const ids: string[] = [];
    for (let i = 0; i < 8; i++) {
      ids.push((await alice.rest.createChannel({ kind: "channel", name: `cap ${i}`, members: ["bob"] })).id);
    }
    const proxy = new TcpProxy(s.port);
    await proxy.up();
    const bob = await clientFor(s, "bob", { url: proxy.url, backoff: { initialMs: 20, maxMs: 200 } });
    cleanup.push(() => bob.close(), () => proxy.down());
    const log = new EventLog(bob);
    const resyncs: ResyncInfo[] = [];
    bob.on("resync", (r) => resyncs.push(r));
    await bob.connect();
    expect(bob.connection.welcome?.limits.max_resume_channels).toBe(3);
    for (const id of ids) await bob.subscribe(id);
    await proxy.down();
    await waitUntil("bob is reconnecting", () => bob.connection.state === "reconnecting");
    for (const id of ids) await alice.rest.sendMessage(id, { client_msg_id: `m-${id}`, text: `missed in ${id}` });
    await proxy.up();
    await waitUntil("bob has every missed message", () => ids.every((id) => log.texts(id).length === 1), {
      detail: () => JSON.stringify(ids.map((id) => log.texts(id))),
    });
    // Replayed by the server's resume (not refused as a whole and filled from storage).
    expect(resyncs).toEqual([]);
    expect(ids.every((id) => log.of(id).every((e) => !("fromHistory" in e && e.fromHistory)))).toBe(true);
  });
});

describe("limits and auth", () => {
  it("paces its frames to the welcome's budget: 20 sends at 5 frames/s are never refused, also after a reconnect", async () => {
    const s = await server(["--ws-frames-per-second", "5", "--ws-frame-burst", "5"]);
    const alice = await clientFor(s, "alice");
    cleanup.push(() => alice.close());
    const errors: string[] = [];
    alice.on("error", (e) => errors.push(e.code));
    const channel = await alice.rest.createChannel({ kind: "channel", name: "budget" });
    await alice.connect();
    expect(alice.connection.welcome?.limits.frames_per_second).toBe(5);
    const batch = (from: number) =>
      within(
        "10 paced sends",
        15_000,
        Promise.all(Array.from({ length: 10 }, (_, i) => alice.send(channel.id, `paced ${from + i}`))),
      );
    const first = await batch(0);
    // Pacing keeps working on a new connection (its budget starts over).
    alice.reconnectNow();
    await within("connected again", 10_000, alice.connection.waitFor("connected"));
    const second = await batch(10);
    expect([...first, ...second].map((r) => r.message.text)).toEqual(Array.from({ length: 20 }, (_, i) => `paced ${i}`));
    expect(errors).toEqual([]);
    expect(alice.connection.state).toBe("connected");
  });

  it("turns a REST 429 into rate_limited with retryAfterMs, and retries after it when allowed", async () => {
    const s = await server(["--rate-per-minute", "60", "--rate-burst", "2"]);
    const token = await s.token("alice");
    const noRetry = new RestClient({ baseUrl: s.url, token, maxRetries: 0 });
    const outcomes = await Promise.allSettled([1, 2, 3, 4].map(() => noRetry.listChannels()));
    const refused = outcomes.find((o) => o.status === "rejected") as PromiseRejectedResult | undefined;
    expect(refused, "the burst of 2 is spent by 4 calls").toBeDefined();
    const error = refused!.reason as ParleyError;
    expect(error).toBeInstanceOf(ParleyError);
    expect(error.code).toBe("rate_limited");
    expect(error.status).toBe(429);
    expect(error.retryAfterMs).toBeGreaterThan(0);
    expect(error.retryable).toBe(true);
    const patient = new RestClient({ baseUrl: s.url, token, maxRetries: 3 });
    await expect(within("a retried call", 10_000, patient.listChannels())).resolves.toHaveProperty("channels");
  });

  it("stops with a typed error when the server refuses a static token", async () => {
    const s = await server([]);
    const client = await clientFor(s, "alice", { token: "not-a-jwt" });
    cleanup.push(() => client.close());
    const queued = client.send("ch-any", "sent before the refusal").catch((e: unknown) => e);
    const outcome = await within("connect() to fail", 10_000, client.connect().catch((e: unknown) => e));
    expect(outcome).toBeInstanceOf(ParleyError);
    expect((outcome as ParleyError).code).toBe("token_malformed");
    expect(client.connection.state).toBe("disconnected");
    // A send waiting in the outbox fails with the same reason, and so does a later one.
    const waited = await within("the queued send to fail", 5_000, queued);
    expect((waited as ParleyError).code).toBe("token_malformed");
    expect(client.pendingMessages()).toHaveLength(0);
    const later = await within("a later send to fail", 5_000, client.send("ch-any", "after").catch((e: unknown) => e));
    expect((later as ParleyError).code).toBe("token_malformed");
  });
});
