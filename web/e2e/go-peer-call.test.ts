/**
 * A call between a Go peer (pion, sdk/go/examples/callpeer) and Chromium running the JS SDK
 * (e2e/pages/callpeer.ts), through a real `parley serve`: the browser sends video and a data
 * channel message; the Go peer receives video RTP and echoes the message back.
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { copyFile, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import * as esbuild from "esbuild";
import type { Browser } from "playwright-core";
import { artifactsDir, screenshot, webDir } from "./harness/artifacts.js";
import { launchChromium, logPageErrors, newContext } from "./harness/browser.js";
import { startServer, type ParleyServer } from "./harness/server.js";
import { watchSignals } from "./harness/signals.js";
import { waitFor } from "./harness/wait.js";
import { installLoopbackWebRTC } from "./harness/webrtc.js";

const out = artifactsDir("go-peer-call");
const log = (line: string) => console.log(`# ${line}`);
const callpeerSource = resolve(webDir, "../sdk/go/examples/callpeer");

let pageDir: string;
let binDir: string | undefined;
let callpeerBin: string | undefined;
let server: ParleyServer;
let browser: Browser;
let peer: ChildProcess | undefined;

before(async () => {
  if (!process.env.PARLEY_CALLPEER && !existsSync(callpeerSource)) return;
  callpeerBin = process.env.PARLEY_CALLPEER;
  if (!callpeerBin) {
    binDir = await mkdtemp(join(tmpdir(), "parley-callpeer-"));
    callpeerBin = join(binDir, "callpeer");
    log("go build ./examples/callpeer");
    execFileSync("go", ["build", "-o", callpeerBin, "./examples/callpeer"], { cwd: resolve(webDir, "../sdk/go"), stdio: "inherit", timeout: 300_000 });
  }
  // The test page, bundled with the SDK like the app, served by parley from a temporary folder.
  pageDir = await mkdtemp(join(tmpdir(), "parley-callpeer-page-"));
  await esbuild.build({
    absWorkingDir: webDir,
    entryPoints: { callpeer: "e2e/pages/callpeer.ts" },
    bundle: true,
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    outdir: pageDir,
    alias: { "@parley/sdk": join(resolve(process.env.PARLEY_SDK_SRC ?? join(webDir, "../sdk/js/src")), "index.ts") },
    logLevel: "warning",
  });
  await copyFile(join(webDir, "e2e/pages/callpeer.html"), join(pageDir, "index.html"));
  server = await startServer({ webDir: pageDir, logDir: out });
  browser = await launchChromium();
});

after(async () => {
  if (peer && peer.exitCode === null && peer.signalCode === null) peer.kill("SIGKILL");
  await browser?.close().catch(() => {});
  await server?.stop();
  if (pageDir) await rm(pageDir, { recursive: true, force: true });
  if (binDir) await rm(binDir, { recursive: true, force: true });
});

/** What e2e/pages/callpeer.ts puts on `window`. */
interface PageWindow {
  callPeerTest: {
    join(token: string, channelId: string): Promise<{ participantId: string; others: number }>;
    openChat(): Promise<void>;
    send(text: string): boolean;
    state: { channel: RTCDataChannel | null; received: string[] };
  };
}

interface PeerEvent {
  event: string;
  kind?: string;
  packets?: number;
  label?: string;
  text?: string;
  [key: string]: unknown;
}

test("a Go peer and Chromium call each other: video RTP reaches Go, a data channel message is echoed", { timeout: 120_000 }, async (t) => {
  if (!callpeerBin) {
    t.skip("sdk/go/examples/callpeer is not in the repository yet (and PARLEY_CALLPEER is not set)");
    return;
  }
  const api = `http://127.0.0.1:${server.port}`;
  const browserToken = await server.devToken("alice");
  const goToken = await server.devToken("gopher");
  const created = await fetch(`${api}/v1/channels`, {
    method: "POST",
    headers: { authorization: `Bearer ${browserToken}`, "content-type": "application/json" },
    body: JSON.stringify({ kind: "channel", name: "go-call", members: ["gopher"] }),
  });
  const createdBody = await created.text();
  assert.equal(created.status, 201, `creating the channel: ${createdBody}`);
  const channelId = (JSON.parse(createdBody) as { id: string }).id;

  // ---- the Go peer starts the call and joins ----
  const events: PeerEvent[] = [];
  const stderr: string[] = [];
  peer = spawn(callpeerBin, ["--url", api, "--token", goToken, "--channel", channelId, "--timeout", "60s"], { stdio: ["ignore", "pipe", "pipe"] });
  createInterface({ input: peer.stdout! }).on("line", (line) => {
    try {
      events.push(JSON.parse(line) as PeerEvent);
    } catch {
      stderr.push(`(stdout) ${line}`);
    }
  });
  createInterface({ input: peer.stderr! }).on("line", (line) => stderr.push(line));
  const peerExit = new Promise<number | null>((r) => peer!.once("exit", (code) => r(code)));
  const killOnExit = () => peer?.kill("SIGKILL");
  process.once("exit", killOnExit);
  void peerExit.then(() => process.off("exit", killOnExit));
  const seen = (what: string, match: (e: PeerEvent) => boolean) =>
    waitFor(`the Go peer to print ${what}`, () => {
      if (peer!.exitCode !== null) throw new Error(`callpeer exited with ${peer!.exitCode}: ${stderr.slice(-5).join(" | ")}`);
      return events.find(match);
    }, { timeoutMs: 30_000, intervalMs: 100 });
  try {
    await seen('{"event":"joined"}', (e) => e.event === "joined");

    // ---- the browser joins the same call ----
    const context = await newContext(browser, server.origin);
    await context.addInitScript(installLoopbackWebRTC);
    const page = await context.newPage();
    logPageErrors(page, "chromium", log);
    const signals = watchSignals(page);
    await page.goto(server.origin);
    const joined = await page.evaluate(([token, ch]) => (window as unknown as PageWindow).callPeerTest.join(token!, ch!), [browserToken, channelId]);
    assert.equal(joined.others, 1, "the browser finds the Go peer in the call");
    await page.evaluate(() => (window as unknown as PageWindow).callPeerTest.openChat());

    await seen('{"event":"peer_connected"}', (e) => e.event === "peer_connected");
    await seen('{"event":"track","kind":"video"}', (e) => e.event === "track" && e.kind === "video");
    const firstRtp = await seen("video RTP", (e) => e.event === "rtp" && e.kind === "video" && (e.packets ?? 0) > 0);
    await seen("more video RTP", (e) => e.event === "rtp" && e.kind === "video" && (e.packets ?? 0) > (firstRtp.packets ?? 0) + 50);

    // ---- data channel: the browser's message comes back as echo:<text> ----
    await waitFor("the browser's chat data channel to open", () => page.evaluate(() => (window as unknown as PageWindow).callPeerTest.state.channel?.readyState === "open"), { timeoutMs: 20_000 });
    await seen('{"event":"datachannel_open"}', (e) => e.event === "datachannel_open");
    assert.ok(await page.evaluate(() => (window as unknown as PageWindow).callPeerTest.send("hello from chromium")), "the data channel accepts the message");
    await seen("the browser's data channel message", (e) => e.event === "datachannel_message" && e.text === "hello from chromium");
    await waitFor("the echo in the browser", () => page.evaluate(() => (window as unknown as PageWindow).callPeerTest.state.received.includes("echo:hello from chromium")), { timeoutMs: 15_000 });
    // The Go peer opens a `chat` channel of its own too: the browser sees both open.
    await waitFor("the Go peer's own chat data channel to open in the browser", () =>
      page.evaluate(() => (window as unknown as { callPeerTest: { state: { events: string[] } } }).callPeerTest.state.events.filter((e) => e === "datachannel chat open").length >= 2),
    { timeoutMs: 15_000 });
    await screenshot(page, out, "01-browser-in-call-with-go-peer");

    assert.deepEqual(signals.nonLoopback, [], "the browser signalled only 127.0.0.1 candidates");
    const last = events.filter((e) => e.event === "rtp" && e.kind === "video").at(-1);
    log(`Go peer received ${last?.packets} video RTP packets`);
    await context.close();
  } catch (e) {
    log(`callpeer events: ${JSON.stringify(events.slice(-10))}`);
    log(`callpeer stderr: ${stderr.slice(-20).join("\n# ")}`);
    throw e;
  } finally {
    if (peer.exitCode === null) peer.kill("SIGTERM");
    const timer = setTimeout(() => peer?.kill("SIGKILL"), 5_000);
    await peerExit;
    clearTimeout(timer);
  }
});
