// @ts-check
// A line-based WebSocket client for trying Parley's realtime protocol by hand: no packages, no
// build. Reads one JSON frame per line from stdin, sends it, and prints every frame the server
// sends. Typed interactively or piped in:
//
//   node sdk/js/examples/ws-lines.mjs [ws://127.0.0.1:8080/v1/ws] <<EOF
//   {"type":"auth","token":"$BOB"}
//   {"type":"subscribe","id":"1","channel_id":"$CH"}
//   EOF
//
// `=> ` marks what was sent, `<= ` what the server sent. Empty lines and lines starting with `#`
// are skipped. The next line is sent once the server answered the previous one (a `welcome` for
// `auth`, an `ack` or `error` with the same `id`; at most 5 s), so the output reads in order. At
// the end of the input it waits PARLEY_WAIT_MS (default 1000) for more frames, then closes the
// connection normally (1000). Node 22+ has WebSocket built in; on Node 20 and 21 the script
// restarts itself with --experimental-websocket.
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";

if (typeof globalThis.WebSocket === "undefined") {
  if (process.execArgv.includes("--experimental-websocket")) {
    console.error("This Node has no WebSocket: use Node 22 or newer (or Node 20.10+).");
    process.exit(1);
  }
  const child = spawn(process.execPath, ["--experimental-websocket", "--no-warnings", ...process.argv.slice(1)], { stdio: "inherit" });
  child.on("exit", (code) => process.exit(code ?? 1));
} else {
  await main();
}

async function main() {
  const url = process.argv[2] ?? process.env.PARLEY_WS_URL ?? "ws://127.0.0.1:8080/v1/ws";
  const waitMs = Number(process.env.PARLEY_WAIT_MS ?? 1000);
  const ws = new WebSocket(url, "parley.v1");
  /** @type {((frame: any) => void) | null} */
  let awaiting = null;
  const closed = new Promise((resolve) => {
    ws.addEventListener("close", (e) => {
      console.log(`-- closed (${e.code}${e.reason ? ` ${e.reason}` : ""})`);
      resolve(undefined);
    });
  });
  ws.addEventListener("message", (e) => {
    const text = String(e.data);
    console.log(`<= ${text}`);
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    awaiting?.(frame);
  });
  await new Promise((resolve, reject) => {
    ws.addEventListener("open", resolve, { once: true });
    ws.addEventListener("error", () => reject(new Error(`cannot connect to ${url}`)), { once: true });
  }).catch((e) => {
    console.error(String(e.message));
    process.exit(1);
  });

  const lines = createInterface({ input: process.stdin, terminal: false });
  for await (const raw of lines) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) continue;
    if (ws.readyState !== WebSocket.OPEN) break;
    let sent;
    try {
      sent = JSON.parse(line);
    } catch {
      console.error(`-- not JSON, not sent: ${line}`);
      continue;
    }
    const answered = new Promise((resolve) => {
      const timer = setTimeout(resolve, 5_000);
      awaiting = (frame) => {
        const isAnswer =
          sent.type === "auth"
            ? frame.type === "welcome" || frame.type === "error"
            : sent.id !== undefined && (frame.type === "ack" || frame.type === "error") && frame.id === sent.id;
        if (isAnswer) {
          clearTimeout(timer);
          resolve(undefined);
        }
      };
      if (sent.type !== "auth" && sent.id === undefined) {
        clearTimeout(timer);
        resolve(undefined);
      }
    });
    console.log(`=> ${line}`);
    ws.send(line);
    await answered;
    awaiting = null;
  }
  if (ws.readyState === WebSocket.OPEN) {
    await new Promise((resolve) => setTimeout(resolve, waitMs));
    ws.close(1000);
  }
  await Promise.race([closed, new Promise((resolve) => setTimeout(resolve, 3_000))]);
  process.exit(0);
}
