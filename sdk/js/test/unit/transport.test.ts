/**
 * The transport's state machine with a scripted in-memory socket and fake timers: what it sends,
 * when it reconnects, which delays it honours, and when it gives up. (The same behaviour against
 * the real server and real socket faults is in test/integration.)
 */
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Connection, type ConnectionStateChange } from "../../src/connection.js";
import { Endpoints } from "../../src/endpoints.js";
import type { ParleyError } from "../../src/errors.js";
import { Transport, type TransportHooks } from "../../src/transport.js";

class ScriptedSocket {
  static all: ScriptedSocket[] = [];
  readyState = 0;
  onopen: ((e: unknown) => void) | null = null;
  onmessage: ((e: { data: unknown }) => void) | null = null;
  onclose: ((e: { code: number; reason: string }) => void) | null = null;
  onerror: ((e: unknown) => void) | null = null;
  readonly sent: Array<Record<string, unknown>> = [];
  closed = false;
  constructor(
    readonly url: string,
    readonly protocols: string[],
  ) {
    ScriptedSocket.all.push(this);
  }
  send(data: string): void {
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }
  close(): void {
    this.closed = true;
  }
  // ---- the server's side ----
  open(): void {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(frame: object): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  drop(code = 1006, reason = ""): void {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  welcome(
    limits: Partial<{ frames_per_second: number; frame_burst: number }> = {},
    token: { token_expires_at?: number; token_expires_in_ms?: number } = {},
  ): void {
    this.receive({
      ...token,
      type: "welcome",
      session_id: `ses_${ScriptedSocket.all.indexOf(this)}`,
      user_id: "u",
      tenant_id: "default",
      heartbeat_interval_ms: 25_000,
      heartbeat_timeout_ms: 60_000,
      limits: {
        max_frame_bytes: 65_536,
        max_text_chars: 4_000,
        frames_per_second: limits.frames_per_second ?? 50,
        frame_burst: limits.frame_burst ?? 100,
        send_queue: 1_024,
        max_replay: 1_000,
        resume_window_ms: 120_000,
        presence_grace_ms: 5_000,
        typing_throttle_ms: 3_000,
      },
    });
  }
}

const latest = () => ScriptedSocket.all.at(-1)!;

function setup(token: string | (() => string) = "tok", requestTimeoutMs = 1_000, urls: string[] = ["http://test"]) {
  const connection = new Connection();
  const changes: ConnectionStateChange[] = [];
  connection.on("statechange", (c) => changes.push(c));
  const fatal: ParleyError[] = [];
  const restores: Array<string | undefined> = [];
  const hooks: TransportHooks = {
    restore: async (_w, previous) => {
      restores.push(previous);
    },
    frame: () => {},
    error: () => {},
    dropped: () => {},
    fatal: (e) => fatal.push(e),
  };
  const transport = new Transport({
    endpoints: new Endpoints(urls, "listed"),
    token,
    WebSocket: ScriptedSocket,
    backoff: { initialMs: 100, maxMs: 1_000, jitter: 0 },
    requestTimeoutMs,
    connection,
    hooks,
  });
  return { transport, connection, changes, fatal, restores };
}

async function connect(t: ReturnType<typeof setup>, limits?: Parameters<ScriptedSocket["welcome"]>[0]) {
  const socket = latest();
  socket.open();
  await vi.advanceTimersByTimeAsync(0);
  socket.welcome(limits);
  await vi.advanceTimersByTimeAsync(0);
  expect(t.connection.state).toBe("connected");
  return socket;
}

beforeEach(() => {
  vi.useFakeTimers();
  ScriptedSocket.all = [];
});
afterEach(() => vi.useRealTimers());

describe("Transport", () => {
  it("opens with the parley.v1 subprotocol, authenticates first, and is connected after welcome and restore", async () => {
    const t = setup();
    t.transport.start();
    expect(t.connection.state).toBe("connecting");
    expect(latest().protocols).toEqual(["parley.v1"]);
    const socket = await connect(t);
    expect(socket.sent[0]).toEqual({ type: "auth", token: "tok" });
    expect(t.restores).toEqual([undefined]);
    expect(t.changes.map((c) => c.current)).toEqual(["connecting", "connected"]);
  });

  it("reconnects with growing delays and resumes with the previous session", async () => {
    const t = setup();
    t.transport.start();
    await connect(t);
    latest().drop();
    expect(t.changes.at(-1)).toMatchObject({ current: "reconnecting", retryInMs: 100 });
    await vi.advanceTimersByTimeAsync(100);
    latest().drop(); // refused
    expect(t.changes.at(-1)).toMatchObject({ current: "reconnecting", retryInMs: 200 });
    await vi.advanceTimersByTimeAsync(200);
    await connect(t);
    expect(t.restores).toEqual([undefined, "ses_0"]);
    expect(t.changes.at(-1)).toMatchObject({ current: "connected", reconnected: true });
    latest().drop();
    expect(t.changes.at(-1)?.retryInMs, "backoff starts over after a good connection").toBe(100);
  });

  it("moves to the next address after a drop and after a refused attempt, round robin, with the backoff", async () => {
    const t = setup("tok", 1_000, ["http://a:1", "http://b:2/", "https://c:3"]);
    t.transport.start();
    expect(latest().url).toBe("ws://a:1/v1/ws");
    await connect(t);
    expect(t.connection.url).toBe("http://a:1");
    latest().drop(); // node a dies
    expect(t.changes.at(-1)).toMatchObject({ current: "reconnecting", retryInMs: 100 });
    const before = ScriptedSocket.all.length;
    await vi.advanceTimersByTimeAsync(99);
    expect(ScriptedSocket.all.length, "the backoff applies to the next address too").toBe(before);
    await vi.advanceTimersByTimeAsync(1);
    expect(latest().url).toBe("ws://b:2/v1/ws");
    latest().drop(); // b refuses
    await vi.advanceTimersByTimeAsync(200);
    expect(latest().url).toBe("wss://c:3/v1/ws");
    await connect(t);
    expect(t.connection.url).toBe("https://c:3");
    expect(t.restores, "the resume names the previous session whatever the node").toEqual([undefined, "ses_0"]);
    latest().drop();
    await vi.advanceTimersByTimeAsync(100);
    expect(latest().url, "after the last address, the first again").toBe("ws://a:1/v1/ws");
  });

  it("waits at least the retry_after_ms of an error frame before reconnecting", async () => {
    const t = setup();
    t.transport.start();
    await connect(t);
    latest().receive({ type: "error", code: "rate_limited", message: "flood", retry_after_ms: 5_000 });
    latest().drop(4008, "rate limit flood");
    expect(t.changes.at(-1)).toMatchObject({ current: "reconnecting", retryInMs: 5_000 });
    expect(t.changes.at(-1)?.error?.code).toBe("rate_limited");
    const sockets = ScriptedSocket.all.length;
    await vi.advanceTimersByTimeAsync(4_999);
    expect(ScriptedSocket.all.length).toBe(sockets);
    await vi.advanceTimersByTimeAsync(1);
    expect(ScriptedSocket.all.length).toBe(sockets + 1);
  });

  it("gives up with the server's error when a static token is refused", async () => {
    const t = setup("bad");
    t.transport.start();
    latest().open();
    await vi.advanceTimersByTimeAsync(0);
    latest().receive({ type: "error", code: "token_expired", message: "expired" });
    latest().drop(4001, "authentication failed");
    expect(t.connection.state).toBe("disconnected");
    expect(t.fatal.map((e) => e.code)).toEqual(["token_expired"]);
    await vi.advanceTimersByTimeAsync(60_000);
    expect(ScriptedSocket.all).toHaveLength(1);
  });

  it("asks a token function again for every connection, and keeps retrying when it is refused", async () => {
    let n = 0;
    const t = setup(() => `tok-${++n}`);
    t.transport.start();
    latest().open();
    await vi.advanceTimersByTimeAsync(0);
    latest().drop(4001);
    expect(t.connection.state).toBe("reconnecting");
    await vi.advanceTimersByTimeAsync(100);
    await connect(t);
    expect(ScriptedSocket.all.map((s) => s.sent[0]?.token)).toEqual(["tok-1", "tok-2"]);
  });

  it("fails pending requests with disconnected when the socket drops", async () => {
    const t = setup();
    t.transport.start();
    await connect(t);
    const pending = t.transport.request({ type: "subscribe", channel_id: "ch" });
    latest().drop();
    await expect(pending).rejects.toMatchObject({ code: "disconnected" });
    await expect(t.transport.request({ type: "ping" })).rejects.toMatchObject({ code: "disconnected" });
  });

  it("retries a rate-limited request after the server's delay", async () => {
    const t = setup();
    t.transport.start();
    const socket = await connect(t);
    const answer = t.transport.request({ type: "read", channel_id: "ch", seq: 3 });
    const first = socket.sent.at(-1)!;
    socket.receive({ type: "error", id: first.id, code: "rate_limited", message: "later", retry_after_ms: 300 });
    await vi.advanceTimersByTimeAsync(299);
    expect(socket.sent.at(-1)).toBe(first);
    await vi.advanceTimersByTimeAsync(1);
    const second = socket.sent.at(-1)!;
    expect(second).toMatchObject({ type: "read", seq: 3 });
    socket.receive({ type: "ack", id: second.id, last_read_seq: 3 });
    await expect(answer).resolves.toMatchObject({ last_read_seq: 3 });
  });

  it("drops a connection whose ping gets no pong, and replaces it", async () => {
    const t = setup("tok", 1_000);
    t.transport.start();
    const socket = await connect(t);
    await vi.advanceTimersByTimeAsync(25_000);
    expect(socket.sent.at(-1)).toMatchObject({ type: "ping" });
    await vi.advanceTimersByTimeAsync(1_000);
    expect(t.changes.at(-1)).toMatchObject({ current: "reconnecting", reason: "no pong in time" });
    expect(socket.closed).toBe(true);
  });

  it("paces frames to 90 % of the welcome's budget", async () => {
    const t = setup();
    t.transport.start();
    const socket = await connect(t, { frames_per_second: 10, frame_burst: 3 }); // 9/s, burst 2
    const before = socket.sent.length;
    for (let i = 0; i < 5; i++) t.transport.request({ type: "typing.start", channel_id: "ch" }).catch(() => {});
    expect(socket.sent.length - before).toBe(2);
    await vi.advanceTimersByTimeAsync(112);
    expect(socket.sent.length - before).toBe(3);
    await vi.advanceTimersByTimeAsync(224);
    expect(socket.sent.length - before).toBe(5);
  });

  it("starts over on a new socket when restoring the subscriptions fails", async () => {
    const t = setup();
    let fail = true;
    const transport = new Transport({
      endpoints: new Endpoints("http://test"),
      token: "tok",
      WebSocket: ScriptedSocket,
      backoff: { initialMs: 100, maxMs: 1_000, jitter: 0 },
      requestTimeoutMs: 1_000,
      connection: t.connection,
      hooks: {
        restore: async () => {
          if (fail) throw new Error("subscribe timed out");
        },
        frame: () => {},
        error: () => {},
        dropped: () => {},
        fatal: () => {},
      },
    });
    transport.start();
    latest().open();
    await vi.advanceTimersByTimeAsync(0);
    latest().welcome();
    await vi.advanceTimersByTimeAsync(0);
    expect(t.connection.state, "never reported connected").toBe("reconnecting");
    fail = false;
    await vi.advanceTimersByTimeAsync(100);
    await connect(t);
  });

  it("gives up on a socket that sends no welcome in time", async () => {
    const t = setup("tok", 1_000);
    t.transport.start();
    latest().open();
    await vi.advanceTimersByTimeAsync(1_000);
    expect(t.changes.at(-1)).toMatchObject({ current: "reconnecting", reason: "no welcome in time" });
  });

  it("refreshes a token function's token ahead of its expiry, and stops when the expiry no longer moves", async () => {
    let n = 0;
    const t = setup(() => `tok${++n}`);
    t.transport.start();
    const socket = latest();
    socket.open();
    await vi.advanceTimersByTimeAsync(0);
    socket.welcome({}, { token_expires_at: 1_000, token_expires_in_ms: 8_000 });
    await vi.advanceTimersByTimeAsync(0);
    const refreshes = () => socket.sent.filter((f) => f.type === "auth.refresh");
    // A quarter of 8 s ahead: at 6 s.
    await vi.advanceTimersByTimeAsync(5_900);
    expect(refreshes()).toEqual([]);
    await vi.advanceTimersByTimeAsync(200);
    expect(refreshes()).toMatchObject([{ type: "auth.refresh", token: "tok2" }]);
    socket.receive({ type: "ack", id: refreshes()[0]!.id, token_expires_at: 1_008, token_expires_in_ms: 8_000 });
    await vi.advanceTimersByTimeAsync(6_100);
    expect(refreshes()).toHaveLength(2);
    // The same expiry again (a function that hands out the same token): no more refreshes.
    socket.receive({ type: "ack", id: refreshes()[1]!.id, token_expires_at: 1_008, token_expires_in_ms: 1_900 });
    await vi.advanceTimersByTimeAsync(10_000);
    expect(refreshes()).toHaveLength(2);
    t.transport.stop("done");
  });

  it("does not refresh a static token", async () => {
    const t = setup("static");
    t.transport.start();
    const socket = latest();
    socket.open();
    await vi.advanceTimersByTimeAsync(0);
    socket.welcome({}, { token_expires_at: 1_000, token_expires_in_ms: 4_000 });
    await vi.advanceTimersByTimeAsync(10_000);
    expect(socket.sent.filter((f) => f.type === "auth.refresh")).toEqual([]);
    t.transport.stop("done");
  });
});
