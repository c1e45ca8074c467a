/**
 * Tokens end: the server closes a connection (4011) when its token expires. With a token
 * function, the client asks it again ahead of the expiry and sends `auth.refresh`, so one
 * connection outlives many short-lived tokens; with a static token, the connection ends at the
 * expiry and the client stops (the server refuses the expired token).
 */
import WebSocket from "ws";
import { afterEach, describe, expect, it } from "vitest";
import { ParleyClient, type ConnectionStateChange } from "../../src/index.js";
import { startServer, type TestServer } from "../helpers/server.js";
import { sleep, waitUntil } from "../helpers/wait.js";

const cleanup: Array<() => unknown> = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function server(): Promise<TestServer> {
  const s = await startServer([]);
  cleanup.push(() => s.stop());
  return s;
}

describe("token refresh", () => {
  it("a connection lives past its first token's expiry because the token function was asked again", async () => {
    const s = await server();
    let asked = 0;
    const client = new ParleyClient({
      url: s.url,
      token: async () => {
        asked += 1;
        return s.token("alice", { ttl: "4s" });
      },
      WebSocket,
      backoff: { initialMs: 50, maxMs: 1_000 },
    });
    cleanup.push(() => client.close());
    const changes: ConnectionStateChange[] = [];
    client.connection.on("statechange", (c) => changes.push(c));
    await client.connect();
    const welcome = client.connection.welcome;
    expect(welcome?.token_expires_in_ms).toBeGreaterThan(0);
    expect(welcome?.token_expires_in_ms).toBeLessThanOrEqual(4_000);
    const sessionId = welcome?.session_id;
    const channel = await client.rest.createChannel({ kind: "channel", name: "refresh", members: [] });
    await client.subscribe(channel.id);
    // Two lifetimes of the first token.
    await sleep(8_000);
    expect(asked, "the token function was asked for new tokens").toBeGreaterThanOrEqual(3);
    expect(client.connection.state).toBe("connected");
    expect(client.connection.welcome?.session_id, "still the first connection").toBe(sessionId);
    expect(changes.filter((c) => c.current === "reconnecting"), "no reconnect").toEqual([]);
    const sent = await client.send(channel.id, "still here");
    expect(sent.message.text).toBe("still here");
  }, 30_000);

  it("a static token: the connection ends at its expiry with 4011 and is not retried", async () => {
    const s = await server();
    const token = await s.token("bob", { ttl: "3s" });
    const client = new ParleyClient({ url: s.url, token, WebSocket, backoff: { initialMs: 50, maxMs: 200 } });
    cleanup.push(() => client.close());
    const changes: ConnectionStateChange[] = [];
    client.connection.on("statechange", (c) => changes.push(c));
    await client.connect();
    await waitUntil("the client stops", () => client.connection.state === "disconnected", { timeoutMs: 15_000 });
    expect(changes.some((c) => c.current === "reconnecting" && (c.reason ?? "").includes("4011"))).toBe(true);
  }, 30_000);
});
