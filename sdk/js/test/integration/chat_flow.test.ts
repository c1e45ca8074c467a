/**
 * The whole chat flow through the SDK against a real server: channels and members over REST,
 * live events over the realtime client (send, edit, delete), history paging, typing, read
 * receipts and unread counts, presence.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ParleyError, type ParleyClient } from "../../src/index.js";
import { EventLog, clientFor } from "../helpers/clients.js";
import { startServer, type TestServer } from "../helpers/server.js";
import { waitUntil, within } from "../helpers/wait.js";

let server: TestServer;
let alice: ParleyClient;
let bob: ParleyClient;
let bobLog: EventLog;
let channelId: string;

beforeAll(async () => {
  server = await startServer(["--presence-grace-ms", "200", "--typing-throttle-ms", "200", "--typing-expiry-ms", "1000"]);
  alice = await clientFor(server, "alice");
  bob = await clientFor(server, "bob");
  bobLog = new EventLog(bob);
});

afterAll(async () => {
  alice?.close();
  bob?.close();
  await server?.stop();
});

describe("chat flow", () => {
  it("creates a channel and adds a member over REST", async () => {
    const channel = await alice.rest.createChannel({ kind: "channel", name: "general" });
    expect(channel.role, "the creator is the owner").toBe("owner");
    channelId = channel.id;
    const member = await alice.rest.addMember(channelId, { user_id: "bob" });
    expect(member).toMatchObject({ user_id: "bob", role: "member" });
    const { members } = await bob.rest.listMembers(channelId);
    expect(members.map((m) => m.user_id).sort()).toEqual(["alice", "bob"]);
    const renamed = await alice.rest.renameChannel(channelId, "general-2");
    expect(renamed.name).toBe("general-2");
    expect((await bob.rest.getChannel(channelId)).name).toBe("general-2");
  });

  it("connects, subscribes and receives a sent message live, once", async () => {
    const states: string[] = [];
    bob.connection.on("statechange", (c) => states.push(c.current));
    await within("both clients connected", 10_000, Promise.all([alice.connect(), bob.connect()]));
    expect(states, "bob's states").toEqual(["connecting", "connected"]);
    expect(bob.connection.welcome?.user_id).toBe("bob");
    const sub = await within("bob's subscribe", 5_000, bob.subscribe(channelId));
    await alice.subscribe(channelId);
    const result = await within("alice's send ack", 5_000, alice.send(channelId, "hello bob"));
    expect(result.created).toBe(true);
    expect(result.message.seq).toBeGreaterThan(sub.seq);
    await waitUntil("bob has the message", () => bobLog.texts(channelId).includes("hello bob"), {
      detail: () => JSON.stringify(bobLog.events),
    });
    expect(bobLog.texts(channelId)).toEqual(["hello bob"]);
  });

  it("tells a connected user at once that they were added to a channel (channel.added)", async () => {
    const added: { id: string; role: string | undefined; by: string }[] = [];
    bob.on("channel.added", (e) => added.push({ id: e.channel.id, role: e.channel.role ?? undefined, by: e.by }));
    const channel = await alice.rest.createChannel({ kind: "channel", name: "announcements" });
    expect(added, "not a member yet").toEqual([]);
    await alice.rest.addMember(channel.id, { user_id: "bob", role: "moderator" });
    await waitUntil("bob hears of the channel", () => added.length === 1, { detail: () => JSON.stringify(added) });
    expect(added).toEqual([{ id: channel.id, role: "moderator", by: "alice" }]);
  });

  it("delivers edits and deletes as events in seq order", async () => {
    const { message } = await alice.send(channelId, "to be edited");
    const edited = await alice.rest.editMessage(channelId, message.id, { text: "edited" });
    expect(edited.text).toBe("edited");
    const tombstone = await alice.rest.deleteMessage(channelId, message.id);
    expect(tombstone.deleted).toBe(true);
    await waitUntil("bob saw the delete", () => bobLog.of(channelId, "message.deleted").length === 1, {
      detail: () => JSON.stringify(bobLog.of(channelId).map((e) => [e.type, e.seq])),
    });
    const events = bobLog.of(channelId);
    const seqs = events.map((e) => e.seq);
    expect(seqs, "strictly increasing without gaps").toEqual(seqs.map((_, i) => (seqs[0] ?? 0) + i));
    expect(events.slice(-3).map((e) => e.type)).toEqual(["message.new", "message.updated", "message.deleted"]);
    // The same events, persisted, over REST (for filling a gap in what was received live).
    const from = (events.at(-3)?.seq ?? 1) - 1;
    const page = await bob.rest.events(channelId, { after: from, limit: 3 });
    expect(page.events.map((e) => [e.type, e.seq])).toEqual(events.slice(-3).map((e) => [e.type, e.seq]));
    expect(page.has_more).toBe(false);
  });

  it("pages history before, after and around, and refuses a limit over 200", async () => {
    for (let i = 0; i < 25; i++) await alice.rest.sendMessage(channelId, { client_msg_id: `page-${i}`, text: `page ${i}` });
    const newest = await bob.history(channelId, { limit: 10 });
    expect(newest.messages).toHaveLength(10);
    expect(newest.has_before).toBe(true);
    expect(newest.messages.at(-1)?.text).toBe("page 24");
    const first = newest.messages[0]!;
    const older = await bob.history(channelId, { before: first.seq, limit: 10 });
    expect(older.messages.at(-1)?.seq).toBeLessThan(first.seq);
    const after = await bob.history(channelId, { after: older.messages[0]!.seq, limit: 5 });
    expect(after.messages.map((m) => m.seq)).toEqual(older.messages.slice(1, 6).map((m) => m.seq));
    const around = await bob.history(channelId, { around: first.seq, limit: 4 });
    expect(around.messages.map((m) => m.seq)).toContain(first.seq);
    const all: string[] = [];
    for await (const page of bob.historyPages(channelId, { limit: 7 })) all.unshift(...page.map((m) => m.text));
    expect(all.filter((t) => t.startsWith("page ")).length).toBe(25);
    const refused = await bob.history(channelId, { limit: 201 }).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(ParleyError);
    expect((refused as ParleyError).code).toBe("invalid_argument");
  });

  it("shows typing with a debounced start and stop", async () => {
    const seen: string[] = [];
    bob.on("typing", (e) => seen.push(`${e.user_id}:${e.state}`));
    alice.typing.keystroke(channelId);
    alice.typing.keystroke(channelId); // within the throttle: no second start
    await waitUntil("bob sees alice typing", () => bob.typing.users(channelId).includes("alice"), {
      detail: () => `typing events: ${seen.join(", ")}`,
    });
    alice.typing.stop(channelId);
    await waitUntil("bob sees alice stop", () => bob.typing.users(channelId).length === 0, {
      detail: () => `typing events: ${seen.join(", ")}`,
    });
    expect(seen[0]).toBe("alice:start");
    expect(seen.filter((x) => x === "alice:start"), "one start for two quick keystrokes").toHaveLength(1);
    expect(seen).toContain("alice:stop");
  });

  it("moves read positions, announces them and updates unread counts", async () => {
    const readUpdates: number[] = [];
    alice.on("read.updated", (e) => {
      if (e.user_id === "bob") readUpdates.push(e.last_read_seq);
    });
    const before = await bob.refreshUnread();
    expect(before.get(channelId)?.unreadCount, "bob has unread messages").toBeGreaterThan(0);
    const last = (await bob.history(channelId, { limit: 1 })).messages[0]!;
    const position = await within("bob's read ack", 5_000, bob.markRead(channelId, last.seq));
    expect(position).toBe(last.seq);
    await waitUntil("alice sees bob's read position", () => readUpdates.includes(last.seq), {
      detail: () => `read.updated seqs: ${readUpdates.join(",")}`,
    });
    await waitUntil("bob's unread count is 0", () => bob.unreadCount(channelId) === 0, {
      detail: () => `unread: ${bob.unreadCount(channelId)}`,
    });
    expect((await bob.rest.readState(channelId)).unread_count).toBe(0);
    await alice.send(channelId, "one more");
    await waitUntil("bob's unread count is 1", () => bob.unreadCount(channelId) === 1, {
      detail: () => `unread: ${bob.unreadCount(channelId)}`,
    });
  });

  it("delivers coalesced presence (presence.batch) as one presence.changed per user", async () => {
    const users = ["batch1", "batch2", "batch3"];
    const seen = new Set<string>();
    bob.on("presence.changed", (e) => {
      if (users.includes(e.user_id) && e.status === "online") seen.add(e.user_id);
    });
    for (const user_id of users) await alice.rest.addMember(channelId, { user_id });
    const clients = await Promise.all(users.map((u) => clientFor(server, u)));
    try {
      // Connected together, well within one coalescing interval of each other.
      await Promise.all(clients.map((c) => c.connect()));
      await waitUntil("bob sees the three users online", () => seen.size === users.length, {
        detail: () => [...seen].join(","),
      });
      expect(bob.presenceOf("batch2")?.status, "the presence cache follows batched changes").toBe("online");
    } finally {
      for (const c of clients) c.close();
    }
  });

  it("reports presence: online, away, offline, and answers presence queries", async () => {
    const changes: string[] = [];
    bob.on("presence.changed", (e) => {
      if (e.user_id === "carol") changes.push(e.status);
    });
    await alice.rest.addMember(channelId, { user_id: "carol" });
    const carol = await clientFor(server, "carol");
    try {
      await carol.connect();
      await waitUntil("bob sees carol online", () => changes.includes("online"), { detail: () => changes.join(",") });
      await carol.setAway(true);
      await waitUntil("bob sees carol away", () => changes.includes("away"), { detail: () => changes.join(",") });
      expect((await bob.rest.userPresence("carol")).status).toBe("away");
      expect(bob.presenceOf("carol")?.status, "bob's presence cache follows the events").toBe("away");
      await bob.loadPresence(["alice"]);
      expect(bob.presenceOf("alice")?.status).toBe("online");
      const { presence } = await bob.rest.queryPresence(["carol", "alice", "nobody-shares-a-channel"]);
      expect(presence.map((p) => p.user_id).sort()).toEqual(["alice", "carol"]);
    } finally {
      carol.close();
    }
    await waitUntil("bob sees carol offline after the grace period", () => changes.at(-1) === "offline", {
      detail: () => changes.join(","),
    });
    expect((await bob.rest.userPresence("carol")).last_seen).toBeTruthy();
  });

  it("turns server errors into ParleyError with code, status and request id", async () => {
    const e = await bob.rest.getChannel("ch_00000000000000000000000000").catch((x: unknown) => x);
    expect(e).toBeInstanceOf(ParleyError);
    const error = e as ParleyError;
    expect(error.code).toBe("not_found");
    expect(error.status).toBe(404);
    expect(error.requestId).toMatch(/\w+/);
    const renameByMember = await bob.rest.renameChannel(channelId, "mine").catch((x: unknown) => x);
    expect((renameByMember as ParleyError).code).toBe("forbidden");
    expect((renameByMember as ParleyError).status).toBe(403);
  });

  it("surfaces an idempotency conflict of the outbox as an error, and a same-body retry as one message", async () => {
    const first = await alice.send(channelId, "same key", { clientMsgId: "fixed-key" });
    const again = await alice.send(channelId, "same key", { clientMsgId: "fixed-key" });
    expect(again.created).toBe(false);
    expect(again.message.id).toBe(first.message.id);
    const conflict = await alice.send(channelId, "other body", { clientMsgId: "fixed-key" }).catch((x: unknown) => x);
    expect(conflict).toBeInstanceOf(ParleyError);
    expect((conflict as ParleyError).code).toBe("idempotency_conflict");
    expect(alice.pendingMessages()).toHaveLength(0);
    await waitUntil("bob has 'same key' once", () => bobLog.texts(channelId).includes("same key"));
    expect(bobLog.texts(channelId).filter((t) => t === "same key")).toHaveLength(1);
  });

  it("changes a member's role, and the member sees member.updated live", async () => {
    const updates: string[] = [];
    bob.on("member.updated", (e) => updates.push(`${e.member.user_id}:${e.member.role}:${e.by}`));
    const member = await alice.rest.updateMemberRole(channelId, "bob", "moderator");
    expect(member).toMatchObject({ user_id: "bob", role: "moderator" });
    await waitUntil("bob sees his new role", () => updates.length === 1, { detail: () => updates.join(",") });
    expect(updates).toEqual(["bob:moderator:alice"]);
    const raise = await bob.rest.updateMemberRole(channelId, "bob", "owner").catch((x: unknown) => x);
    expect((raise as ParleyError).code).toBe("forbidden");
    const lastOwner = await alice.rest.updateMemberRole(channelId, "alice", "member").catch((x: unknown) => x);
    expect((lastOwner as ParleyError).code).toBe("conflict");
    expect((lastOwner as ParleyError).status).toBe(409);
  });

  it("ends the subscription of a removed member", async () => {
    const lost: string[] = [];
    bob.on("subscription.lost", (e) => lost.push(`${e.channelId}:${e.reason}`));
    await alice.rest.removeMember(channelId, "bob");
    await waitUntil("bob's subscription ended", () => lost.length === 1, { detail: () => lost.join(",") });
    expect(lost).toEqual([`${channelId}:removed`]);
    expect(bob.subscriptions().map((s) => s.channelId)).not.toContain(channelId);
  });
});
