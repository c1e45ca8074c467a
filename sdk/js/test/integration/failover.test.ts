/**
 * kill -9 of a node under load: 1,000 SDK clients, each given both nodes' addresses, spread over
 * two nodes on the test PostgreSQL and NATS (see helpers/nodes.ts for the topology switch); two
 * senders produce messages throughout; one node is killed with SIGKILL. Every client of the dead
 * node reconnects to the other address and resumes, and every client's delivered seqs per channel
 * are contiguous, without duplicates, and complete up to the last acknowledged message.
 */
import net from "node:net";
import WebSocket from "ws";
import { afterEach, describe, expect, it } from "vitest";
import { ParleyClient, RestClient, type DeliveredEvent } from "../../src/index.js";
import { startDeployment } from "../helpers/nodes.js";
import { startServer } from "../helpers/server.js";
import { sleep, waitUntil, within } from "../helpers/wait.js";

const SECRET = "sdk-js-failover-test-secret-0123456789abcdef";
const CLIENTS = 1_000;
const CHANNELS = 20; // 50 subscribed clients each
const cleanup: Array<() => unknown> = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

interface Member {
  user: string;
  channel: string;
  client: ParleyClient;
  /** Seq the subscription went live after. */
  from: number;
  /** Every delivered event of its channel: seq and message id. */
  seqs: number[];
  messageIds: string[];
  nodeBefore: string;
  /** Holes filled from storage (`resync` events) of its channel. */
  resyncs: number;
}

describe("failover", () => {
  it(
    "kill -9 of one of two nodes: its 1,000-client share reconnects to the other address and resumes with nothing lost or repeated",
    async () => {
      const deployment = await startDeployment(2, SECRET);
      cleanup.push(() => deployment.stop());
      const [a, b] = deployment.nodes as [(typeof deployment.nodes)[0], (typeof deployment.nodes)[0]];
      const suffix = Date.now().toString(36);
      const user = (i: number) => `fo-${suffix}-u${i}`;
      const senders = [`fo-${suffix}-sender-a`, `fo-${suffix}-sender-b`];

      // Senders: sender A is on the node that dies (its outbox fails over too), sender B on the other.
      const sender = (name: string, urls: string[]) =>
        new ParleyClient({ url: urls, urlOrder: "listed", token: deployment.token(name), WebSocket, backoff: { initialMs: 200, maxMs: 2_000 } });
      const sendA = sender(senders[0]!, [a.url, b.url]);
      const sendB = sender(senders[1]!, [b.url, a.url]);
      cleanup.push(() => sendA.close(), () => sendB.close());
      await Promise.all([sendA.connect(), sendB.connect()]);

      const channels: string[] = [];
      for (let c = 0; c < CHANNELS; c++) {
        const members = [senders[1]!];
        for (let i = c; i < CLIENTS; i += CHANNELS) members.push(user(i));
        const channel = await sendA.rest.createChannel({ kind: "channel", name: `failover-${c}`, members });
        channels.push(channel.id);
      }

      // 1,000 clients, alternately A-first and B-first (`listed`, so the spread is exact), default backoff.
      const members: Member[] = [];
      for (let i = 0; i < CLIENTS; i++) {
        const urls = i % 2 === 0 ? [a.url, b.url] : [b.url, a.url];
        const client = new ParleyClient({ url: urls, urlOrder: "listed", token: deployment.token(user(i)), WebSocket });
        cleanup.push(() => client.close());
        const m: Member = { user: user(i), channel: channels[i % CHANNELS]!, client, from: 0, seqs: [], messageIds: [], nodeBefore: "", resyncs: 0 };
        client.on("resync", (r) => {
          if (r.channelId === m.channel) m.resyncs += 1;
        });
        client.on("event", (e: DeliveredEvent) => {
          if (e.channel_id !== m.channel) return;
          m.seqs.push(e.seq);
          if (e.type === "message.new") m.messageIds.push(e.message.id);
        });
        members.push(m);
      }
      for (let i = 0; i < CLIENTS; i += 100) {
        await within(
          "100 clients connect and subscribe",
          30_000,
          Promise.all(
            members.slice(i, i + 100).map(async (m) => {
              await m.client.connect();
              m.from = (await m.client.subscribe(m.channel)).seq;
              m.nodeBefore = m.client.connection.url!;
            }),
          ),
        );
      }
      const onA = members.filter((m) => m.nodeBefore === a.url);
      expect(onA.length).toBe(CLIENTS / 2);

      // Two senders, one message every 40 ms each, round robin over the channels.
      const acked = new Map<string, { id: string; seq: number }[]>(channels.map((c) => [c, []]));
      const failures: unknown[] = [];
      let sending = true;
      const inflight: Promise<void>[] = [];
      const produce = async (client: ParleyClient, tag: string) => {
        for (let n = 0; sending; n++) {
          const channel = channels[n % CHANNELS]!;
          inflight.push(
            client.send(channel, `${tag}-${n}`).then(
              (r) => void acked.get(channel)!.push({ id: r.message.id, seq: r.message.seq }),
              (e: unknown) => void failures.push(e),
            ),
          );
          await sleep(40);
        }
      };
      const producers = [produce(sendA, "a"), produce(sendB, "b")];

      await sleep(3_000);
      const ackedBeforeKill = [...acked.values()].reduce((n, l) => n + l.length, 0);
      a.signal("SIGKILL");
      const killedAt = Date.now();

      // Every client of A ends up connected to B.
      await waitUntil("every client of the killed node is connected to the other one", () => onA.every((m) => m.client.connection.state === "connected" && m.client.connection.url === b.url), {
        timeoutMs: 45_000,
        detail: () => {
          const states = new Map<string, number>();
          for (const m of onA) {
            const k = `${m.client.connection.state}@${m.client.connection.url === b.url ? "B" : "A"}`;
            states.set(k, (states.get(k) ?? 0) + 1);
          }
          return JSON.stringify([...states]);
        },
      });
      const failedOverIn = Date.now() - killedAt;
      await sleep(2_000); // keep sending after everyone is back
      sending = false;
      await Promise.all(producers);
      await within("every send is acknowledged", 30_000, Promise.all(inflight));
      expect(failures, "no send failed for good").toEqual([]);

      // Every client delivers through the last acknowledged seq of its channel.
      const lastAcked = new Map([...acked].map(([c, l]) => [c, Math.max(0, ...l.map((x) => x.seq))]));
      await waitUntil("every client has delivered through its channel's last acked seq", () => members.every((m) => (m.seqs.at(-1) ?? m.from) >= lastAcked.get(m.channel)!), {
        timeoutMs: 30_000,
        detail: () => {
          const behind = members.filter((m) => (m.seqs.at(-1) ?? m.from) < lastAcked.get(m.channel)!);
          return `${behind.length} behind, e.g. ${behind.slice(0, 3).map((m) => `${m.user}: at ${m.seqs.at(-1)} of ${lastAcked.get(m.channel)}`).join(", ")}`;
        },
      });

      let problems = 0;
      const report: string[] = [];
      for (const m of members) {
        const last = m.seqs.at(-1)!;
        const expected = Array.from({ length: last - m.from }, (_, k) => m.from + 1 + k);
        const ids = new Set(m.messageIds);
        const missingAcked = acked.get(m.channel)!.filter((x) => !ids.has(x.id));
        const ok = JSON.stringify(m.seqs) === JSON.stringify(expected) && ids.size === m.messageIds.length && missingAcked.length === 0;
        if (!ok) {
          problems += 1;
          if (report.length < 5) {
            report.push(`${m.user} (${m.nodeBefore === a.url ? "A" : "B"}): from ${m.from}, got ${m.seqs.length} seqs ending ${last}, ${m.messageIds.length - ids.size} duplicate ids, ${missingAcked.length} acked missing`);
          }
        }
      }
      expect(problems, report.join("\n")).toBe(0);
      const total = [...acked.values()].reduce((n, l) => n + l.length, 0);
      // Enough traffic on both sides of the kill for the test to mean something.
      expect(ackedBeforeKill).toBeGreaterThan(50);
      expect(total - ackedBeforeKill).toBeGreaterThan(50);
      console.log(
        `failover: ${CLIENTS} clients, ${onA.length} on the killed node, all back on the other in ${failedOverIn} ms; ${total} messages acked (${ackedBeforeKill} before the kill); every client contiguous, no duplicates; holes filled from storage: ${onA.reduce((n, m) => n + m.resyncs, 0)} on the killed node's clients, ${members.reduce((n, m) => n + m.resyncs, 0)} in all`,
      );
    },
    150_000,
  );

  it("a REST request whose first address refuses connections goes to the next one at once, whatever its method", async () => {
    const server = await startServer();
    cleanup.push(() => server.stop());
    const dead = await new Promise<string>((resolve) => {
      const l = net.createServer().listen(0, "127.0.0.1", () => {
        const port = (l.address() as net.AddressInfo).port;
        l.close(() => resolve(`http://127.0.0.1:${port}`));
      });
    });
    const token = await server.token("alice");
    const rest = new RestClient({ baseUrl: [dead, server.url], urlOrder: "listed", token, maxRetries: 0 });
    expect(rest.baseUrl).toBe(dead);
    const channel = await rest.createChannel({ kind: "channel", name: "refused-first" });
    expect(channel.name).toBe("refused-first");
    expect(rest.baseUrl, "REST stays on the address that answered").toBe(server.url);
    // The realtime client starts where its REST is after a refusal too.
    const client = new ParleyClient({ url: [dead, server.url], urlOrder: "listed", token, WebSocket, backoff: { initialMs: 50, maxMs: 200 } });
    cleanup.push(() => client.close());
    await client.connect();
    expect(client.connection.url).toBe(server.url);
    await client.subscribe(channel.id);
  });
});
