/**
 * The Go SDK and the TypeScript SDK in one SFU call, through a real `parley serve` with its
 * in-process SFU and an escalation threshold of 3: a Go peer (pion, sdk/go/examples/callpeer,
 * publishing synthetic VP8 and Opus) starts the call, Chromium running the JS SDK
 * (e2e/pages/callpeer.ts, fake camera) joins, and a second Go peer's join escalates the call.
 * Both SDKs move to the SFU by themselves; the first Go peer counts the browser's video RTP
 * arriving through the SFU, and the browser counts the Go peer's video and audio packets on its
 * SFU connection. The browser's microphone is a steady tone, and the Go peer hears it announced
 * as the active speaker.
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

const out = artifactsDir("go-sfu-call");
const log = (line: string) => console.log(`# ${line}`);
const callpeerSource = resolve(webDir, "../sdk/go/examples/callpeer");

let pageDir: string;
let binDir: string | undefined;
let callpeerBin: string;
let server: ParleyServer;
let browser: Browser;
const peers: ChildProcess[] = [];

before(async () => {
  const prebuilt = process.env.PARLEY_CALLPEER;
  if (prebuilt) {
    callpeerBin = prebuilt;
  } else {
    if (!existsSync(callpeerSource)) throw new Error(`no Go call peer at ${callpeerSource} and PARLEY_CALLPEER is not set`);
    binDir = await mkdtemp(join(tmpdir(), "parley-callpeer-"));
    callpeerBin = join(binDir, "callpeer");
    log("go build ./examples/callpeer");
    execFileSync("go", ["build", "-o", callpeerBin, "./examples/callpeer"], { cwd: resolve(webDir, "../sdk/go"), stdio: "inherit", timeout: 300_000 });
  }
  pageDir = await mkdtemp(join(tmpdir(), "parley-go-sfu-page-"));
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
  server = await startServer({ webDir: pageDir, logDir: out, args: ["--sfu-listen", "127.0.0.1:0", "--sfu-threshold", "3"] });
  browser = await launchChromium();
});

after(async () => {
  for (const p of peers) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  await browser?.close().catch(() => {});
  await server?.stop();
  if (pageDir) await rm(pageDir, { recursive: true, force: true });
  if (binDir) await rm(binDir, { recursive: true, force: true });
});

interface PageWindow {
  callPeerTest: {
    join(token: string, channelId: string, tone?: boolean): Promise<{ participantId: string; others: number }>;
    mode(): string;
    sfuPackets(): Promise<Record<string, { audio: number; video: number }>>;
    state: { events: string[] };
  };
}

interface PeerEvent {
  event: string;
  kind?: string;
  packets?: number;
  publisher?: string;
  participant_id?: string;
  mode?: string;
  state?: string;
  [key: string]: unknown;
}

/** Starts a callpeer process and collects its JSON lines. */
function startPeer(name: string, args: string[]): { events: PeerEvent[]; stderr: string[]; proc: ChildProcess; exit: Promise<number | null> } {
  const events: PeerEvent[] = [];
  const stderr: string[] = [];
  const proc = spawn(callpeerBin, args, { stdio: ["ignore", "pipe", "pipe"] });
  peers.push(proc);
  createInterface({ input: proc.stdout! }).on("line", (line) => {
    try {
      events.push(JSON.parse(line) as PeerEvent);
    } catch {
      stderr.push(`(stdout) ${line}`);
    }
  });
  createInterface({ input: proc.stderr! }).on("line", (line) => stderr.push(`[${name}] ${line}`));
  const exit = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  return { events, stderr, proc, exit };
}

test("Go SDK and TypeScript SDK in one SFU call: the call escalates, each receives the other's media through the SFU", { timeout: 180_000 }, async () => {
  const api = `http://127.0.0.1:${server.port}`;
  const browserToken = await server.devToken("alice");
  const goToken = await server.devToken("gopher");
  const go2Token = await server.devToken("gopher2");
  const created = await fetch(`${api}/v1/channels`, {
    method: "POST",
    headers: { authorization: `Bearer ${browserToken}`, "content-type": "application/json" },
    body: JSON.stringify({ kind: "channel", name: "go-sfu", members: ["gopher", "gopher2"] }),
  });
  const createdBody = await created.text();
  assert.equal(created.status, 201, `creating the channel: ${createdBody}`);
  const channelId = (JSON.parse(createdBody) as { id: string }).id;

  const go = startPeer("gopher", ["--url", api, "--token", goToken, "--channel", channelId, "--timeout", "150s", "--publish"]);
  let go2: ReturnType<typeof startPeer> | undefined;
  const seen = (peer: typeof go, what: string, match: (e: PeerEvent) => boolean, timeoutMs = 30_000) =>
    waitFor(`the Go peer to print ${what}`, () => {
      if (peer.proc.exitCode !== null) throw new Error(`callpeer exited with ${peer.proc.exitCode}: ${peer.stderr.slice(-5).join(" | ")}`);
      return peer.events.find(match);
    }, { timeoutMs, intervalMs: 100 });
  try {
    const joined = await seen(go, '{"event":"joined"}', (e) => e.event === "joined");
    assert.equal(joined.mode, "p2p", "one participant: the call starts peer to peer");
    const goParticipant = joined.participant_id as string;

    // ---- the browser joins: still peer to peer ----
    const context = await newContext(browser, server.origin);
    await context.addInitScript(installLoopbackWebRTC);
    const page = await context.newPage();
    logPageErrors(page, "chromium", log);
    const signals = watchSignals(page);
    await page.goto(server.origin);
    // The browser sends a steady tone as its microphone: the SFU's active speaker.
    const me = await page.evaluate(([token, ch]) => (window as unknown as PageWindow).callPeerTest.join(token!, ch!, true), [browserToken, channelId]);
    assert.equal(me.others, 1, "the browser finds the Go peer in the call");
    assert.equal(await page.evaluate(() => (window as unknown as PageWindow).callPeerTest.mode()), "p2p");
    await seen(go, "the browser's video over P2P", (e) => e.event === "rtp" && e.kind === "video" && (e.packets ?? 0) > 0);

    // ---- a second Go peer crosses the threshold: everyone moves to the SFU ----
    go2 = startPeer("gopher2", ["--url", api, "--token", go2Token, "--channel", channelId, "--timeout", "150s", "--publish"]);
    const joined2 = await seen(go2, '{"event":"joined"}', (e) => e.event === "joined");
    assert.equal(joined2.mode, "sfu", "the join that crosses the threshold answers in sfu mode");
    await seen(go, '{"event":"mode","mode":"sfu"}', (e) => e.event === "mode" && e.mode === "sfu");
    await waitFor("the browser's call to be in sfu mode", () => page.evaluate(() => (window as unknown as PageWindow).callPeerTest.mode() === "sfu"), { timeoutMs: 20_000 });
    await seen(go, "its SFU connection up", (e) => e.event === "sfu_state" && e.state === "connected");

    // ---- Go receives the browser's video through the SFU ----
    const firstRtp = await seen(go, "the browser's video RTP through the SFU", (e) => e.event === "sfu_rtp" && e.publisher === me.participantId && e.kind === "video" && (e.packets ?? 0) > 0, 40_000);
    const moreRtp = await seen(go, "more of the browser's video RTP through the SFU", (e) => e.event === "sfu_rtp" && e.publisher === me.participantId && e.kind === "video" && (e.packets ?? 0) > (firstRtp.packets ?? 0) + 100, 40_000);
    log(`Go peer received ${moreRtp.packets} video RTP packets of the browser through the SFU`);

    // ---- the browser receives the Go peer's video and audio through the SFU ----
    const readPackets = () => page.evaluate(() => (window as unknown as PageWindow).callPeerTest.sfuPackets());
    const first = await waitFor("the browser to receive the Go peer's video and audio through the SFU", async () => {
      const p = (await readPackets())[goParticipant];
      return p && p.video > 0 && p.audio > 0 ? p : false;
    }, { timeoutMs: 40_000, intervalMs: 250 });
    const later = await waitFor("the browser to receive more of the Go peer's media", async () => {
      const p = (await readPackets())[goParticipant];
      return p && p.video > first.video + 100 && p.audio > first.audio + 50 ? p : false;
    }, { timeoutMs: 40_000, intervalMs: 250 });
    log(`browser received from the Go peer through the SFU: ${JSON.stringify(later)}`);
    await screenshot(page, out, "01-browser-in-sfu-call-with-go-peers");

    // The Go SDK hears the active speaker: the browser, the only one making a sound.
    await seen(go, "the browser announced as the active speaker", (e) => e.event === "speaker" && e.participant_id === me.participantId, 30_000);

    assert.deepEqual(signals.nonLoopback, [], "the browser signalled only 127.0.0.1 candidates");
    const errors = (await page.evaluate(() => (window as unknown as PageWindow).callPeerTest.state.events)).filter((l) => l.startsWith("error"));
    assert.deepEqual(errors, [], "no call errors in the browser");
    await context.close();
  } catch (e) {
    for (const [name, p] of [["gopher", go], ["gopher2", go2]] as const) {
      if (!p) continue;
      log(`${name} events: ${JSON.stringify(p.events.slice(-15))}`);
      log(`${name} stderr: ${p.stderr.slice(-20).join("\n# ")}`);
    }
    throw e;
  } finally {
    for (const p of [go, go2]) {
      if (!p) continue;
      if (p.proc.exitCode === null) p.proc.kill("SIGTERM");
      const timer = setTimeout(() => p.proc.kill("SIGKILL"), 5_000);
      await p.exit;
      clearTimeout(timer);
    }
  }
});
