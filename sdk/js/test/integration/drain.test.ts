/**
 * A draining server (SIGTERM) sends a `reconnect` frame: the client leaves after the hinted
 * delay, reconnects at once (a load balancer now sends it to the other node), resumes, and gets
 * every message sent meanwhile once and in order. Two nodes on the test PostgreSQL and NATS
 * (`PARLEY_TEST_DATABASE_URL`, `PARLEY_TEST_NATS_URL`, from scripts/test.sh).
 */
import { createHmac } from "node:crypto";
import net from "node:net";
import WebSocket from "ws";
import { afterEach, describe, expect, it } from "vitest";
import { ParleyClient, RestClient, type ConnectionStateChange } from "../../src/index.js";
import { EventLog } from "../helpers/clients.js";
import { startServer, type TestServer } from "../helpers/server.js";
import { sleep, waitUntil } from "../helpers/wait.js";

const SECRET = "sdk-js-drain-test-secret-0123456789abcdef";
const cleanup: Array<() => unknown> = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

function services(): { db: string; nats: string } {
  const db = process.env.PARLEY_TEST_DATABASE_URL;
  const nats = process.env.PARLEY_TEST_NATS_URL;
  if (!db || !nats) {
    throw new Error(
      'PARLEY_TEST_DATABASE_URL and PARLEY_TEST_NATS_URL are not set: run scripts/test.sh, or eval "$(scripts/services.sh start)" first',
    );
  }
  return { db, nats };
}

/** An HS256 access token for `user` in the default tenant. */
function token(user: string): string {
  const b64 = (v: object) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const signing = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({
    sub: user,
    tid: "default",
    iss: "parley",
    aud: "parley",
    exp: Math.floor(Date.now() / 1000) + 3600,
  })}`;
  return `${signing}.${createHmac("sha256", SECRET).update(signing).digest("base64url")}`;
}

/** A TCP proxy that sends each new connection to the current target, like a load balancer. */
class Switch {
  target: number;
  readonly #server: net.Server;
  constructor(target: number) {
    this.target = target;
    this.#server = net.createServer((client) => {
      const upstream = net.connect(this.target, "127.0.0.1");
      const drop = () => {
        client.destroy();
        upstream.destroy();
      };
      client.on("error", drop).on("close", drop);
      upstream.on("error", drop).on("close", drop);
      client.pipe(upstream);
      upstream.pipe(client);
    });
  }
  async listen(): Promise<string> {
    await new Promise<void>((resolve) => this.#server.listen(0, "127.0.0.1", () => resolve()));
    return `http://127.0.0.1:${(this.#server.address() as net.AddressInfo).port}`;
  }
  close(): Promise<void> {
    return new Promise((resolve) => this.#server.close(() => resolve()));
  }
}

async function server(flags: string[]): Promise<TestServer> {
  const s = await startServer(flags);
  cleanup.push(() => s.stop());
  return s;
}

describe("drain", () => {
  it("a reconnect frame moves the client to another node without losing or repeating a message", async () => {
    const { db, nats } = services();
    const common = ["--database-url", db, "--nats-url", nats, "--jwt-hs256-secret", SECRET];
    const a = await server([...common, "--drain-window-ms", "4000"]);
    const b = await server(common);
    const lb = new Switch(a.port);
    const lbUrl = await lb.listen();
    cleanup.push(() => lb.close());

    const suffix = Date.now().toString(36);
    const [aliceId, bobId] = [`alice-${suffix}`, `bob-${suffix}`];
    const alice = new RestClient({ baseUrl: b.url, token: token(aliceId) });
    const channel = await alice.createChannel({ kind: "channel", name: "drain", members: [bobId] });
    // A long backoff: leaving on the frame must not wait for it.
    const bob = new ParleyClient({ url: lbUrl, token: token(bobId), WebSocket, backoff: { initialMs: 3_000, maxMs: 5_000 } });
    cleanup.push(() => bob.close());
    const changes: ConnectionStateChange[] = [];
    bob.connection.on("statechange", (c) => changes.push(c));
    const log = new EventLog(bob);
    await bob.connect();
    await bob.subscribe(channel.id);

    const expected: string[] = [];
    const send = async (i: number) => {
      const text = `m${String(i).padStart(3, "0")}`;
      await alice.sendMessage(channel.id, { client_msg_id: `d${i}`, text });
      expected.push(text);
    };
    for (let i = 0; i < 5; i++) await send(i);
    await waitUntil("bob has the first messages", () => log.texts(channel.id).length === 5);

    // The load balancer sends new connections to B; A drains.
    lb.target = b.port;
    const start = Date.now();
    a.signal("SIGTERM");
    let i = 5;
    let after = 0;
    while (after < 10 && i < 400) {
      await send(i++);
      if (changes.some((c) => c.current === "connected" && c.reconnected)) after++;
      await sleep(20);
    }
    await waitUntil("bob has every message", () => log.texts(channel.id).length >= expected.length, {
      detail: () => `bob has ${JSON.stringify(log.texts(channel.id))}`,
    });
    expect(log.texts(channel.id)).toEqual(expected);
    const left = changes.find((c) => c.current === "reconnecting");
    expect(left?.reason, "the client left on the reconnect frame").toBe("server draining");
    expect(left?.retryInMs, "and reconnected at once").toBe(0);
    expect(Date.now() - start).toBeLessThan(4_000 + 3_000);
  });
});
