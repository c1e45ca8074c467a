/**
 * The README walkthrough's WebSocket part, as a newcomer runs it: `examples/ws-lines.mjs` (no
 * packages, no build) fed the three frames of the README on stdin, against a real server. The
 * frames must come back in the order the README shows: welcome, the subscribe ack, the send ack,
 * then the message's `message.new` event.
 */
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, expect, it } from "vitest";
import { RestClient } from "../../src/index.js";
import { startServer, type TestServer } from "../helpers/server.js";

const root = fileURLToPath(new URL("../..", import.meta.url));
let server: TestServer;

beforeAll(async () => {
  server = await startServer();
});

afterAll(async () => {
  await server?.stop();
});

function runLines(url: string, input: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["examples/ws-lines.mjs", url], {
      cwd: root,
      env: { ...process.env, PARLEY_WAIT_MS: "300" },
      stdio: ["pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`ws-lines.mjs did not finish within 20 s; stdout:\n${stdout}\nstderr:\n${stderr}`));
    }, 20_000);
    child.on("exit", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(input);
  });
}

it("examples/ws-lines.mjs shows the walkthrough's frames in the README's order", async () => {
  const alice = new RestClient({ baseUrl: server.url, token: await server.token("alice") });
  const bob = await server.token("bob");
  const channel = await alice.createChannel({ kind: "channel", name: "general", members: ["bob"] });
  await alice.sendMessage(channel.id, { client_msg_id: "m-1", text: "hello" });

  const ws = `${server.url.replace(/^http/, "ws")}/v1/ws`;
  const input = [
    `{"type":"auth","token":"${bob}"}`,
    `{"type":"subscribe","id":"1","channel_id":"${channel.id}"}`,
    `{"type":"message.send","id":"2","channel_id":"${channel.id}","client_msg_id":"m-2","text":"hi alice"}`,
    "",
  ].join("\n");
  const { code, stdout, stderr } = await runLines(ws, input);
  expect(code, `exit code; stderr:\n${stderr}`).toBe(0);

  const lines = stdout.split("\n").filter((l) => l.startsWith("=> ") || l.startsWith("<= "));
  const received = lines.filter((l) => l.startsWith("<= ")).map((l) => JSON.parse(l.slice(3)) as Record<string, unknown>);
  expect(received.map((f) => f.type)).toEqual(["welcome", "ack", "ack", "message.new"]);
  expect(received[1]).toMatchObject({ id: "1", channel_id: channel.id, seq: 1 });
  expect(received[2]).toMatchObject({ id: "2", seq: 2, created: true });
  expect(received[3]).toMatchObject({ channel_id: channel.id, seq: 2, message: { text: "hi alice", sender_id: "bob" } });
  // Each answer is printed after the line it answers.
  expect(lines.map((l) => l.slice(0, 2))).toEqual(["=>", "<=", "=>", "<=", "=>", "<=", "<="]);
});
