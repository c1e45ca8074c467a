/**
 * Calls for real: two Chromium pages (fake camera and microphone) use the built SDK against a
 * real server. Each decodes the other's video over the RTCPeerConnection the CallSession owns;
 * a track added mid-call renegotiates; one side's realtime connection is cut, it reconnects,
 * re-attaches, restarts ICE, and video goes on; leaving closes the peer on the other side.
 */
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type Browser, type Page } from "playwright-core";
import { afterAll, beforeAll, expect, it } from "vitest";
import { RestClient } from "../../src/index.js";
import { startServer, type TestServer } from "../helpers/server.js";

const CHROMIUM = process.env.PARLEY_CHROMIUM ?? "/usr/bin/chromium";
const dist = fileURLToPath(new URL("../../dist/index.js", import.meta.url));
const pageScript = fileURLToPath(new URL("./browser/call-page.js", import.meta.url));

let webDir: string | undefined;
let origin: string;
let server: TestServer;
let browser: Browser;
const pages: Page[] = [];

beforeAll(async () => {
  // The page is served by Parley itself (`--web-dir`): the server has no CORS, so a page on
  // another origin could open the WebSocket (with --allowed-origin) but not call the REST API.
  webDir = mkdtempSync(join(tmpdir(), "parley-sdk-js-web-"));
  copyFileSync(dist, join(webDir, "sdk.js"));
  copyFileSync(pageScript, join(webDir, "call-page.js"));
  writeFileSync(
    join(webDir, "index.html"),
    `<!doctype html><meta charset="utf-8"><title>loading</title><script type="module" src="/call-page.js"></script>`,
  );
  server = await startServer(["--web-dir", webDir, "--call-reconnect-grace-ms", "30000"]);
  origin = server.url;
  const args = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--mute-audio",
  ];
  if (process.getuid?.() === 0) args.push("--no-sandbox"); // Chromium's sandbox refuses root
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args, timeout: 30_000 }).catch((e: unknown) => {
    throw new Error(`cannot launch Chromium at ${CHROMIUM} (apt-get install chromium, or set PARLEY_CHROMIUM): ${String(e)}`);
  });
}, 60_000);

afterAll(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
  if (webDir) rmSync(webDir, { recursive: true, force: true });
});

async function person(): Promise<Page> {
  const context = await browser.newContext();
  await context.grantPermissions(["camera", "microphone"], { origin });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await page.goto(origin);
  await page.waitForFunction(() => document.title === "ready");
  pages.push(page);
  return page;
}

const logOf = (page: Page) => page.evaluate(() => (window as unknown as { harness: { log: string[] } }).harness.log);
const frames = (page: Page) => page.evaluate(() => (window as unknown as { harness: { framesDecoded(): Promise<number> } }).harness.framesDecoded());
const call = <T>(page: Page, fn: string, arg?: unknown) =>
  page.evaluate(([f, a]) => (window as unknown as { harness: Record<string, (x: unknown) => T> }).harness[f as string]!(a), [fn, arg] as const);

/** Polls an async value in the page until `check` holds (bounded), naming what was expected. */
async function waitFor<T>(what: string, read: () => Promise<T>, check: (v: T) => boolean, timeoutMs = 20_000): Promise<T> {
  let last: T | undefined;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    last = await read();
    if (check(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

it("two browsers call: video both ways, renegotiation, track swap, reconnect with ICE restart, leave", { timeout: 120_000 }, async () => {
  const aliceToken = await server.token("alice");
  const bobToken = await server.token("bob");
  const channel = await new RestClient({ baseUrl: server.url, token: aliceToken }).createChannel({
    kind: "channel",
    name: "call",
    members: ["bob"],
  });
  const alice = await person();
  const bob = await person();
  const a = await call<Promise<{ callId: string }>>(alice, "start", { url: server.url, token: aliceToken, channelId: channel.id });
  await call(bob, "start", { url: server.url, token: bobToken, callId: a.callId });

  // Roles: alice joined first (impolite towards bob), bob is polite towards alice.
  await waitFor("alice sees bob join as impolite", () => logOf(alice), (l) => l.includes("joined:bob:impolite"));
  await waitFor("bob sees alice as polite", () => logOf(bob), (l) => l.includes("joined:alice:polite"));
  await waitFor("alice decodes bob's video", () => frames(alice), (n) => n > 10);
  await waitFor("bob decodes alice's video", () => frames(bob), (n) => n > 10);

  // Renegotiation: a second video track mid-call reaches the other side.
  await call(alice, "addCanvasTrack");
  await waitFor("bob gets alice's second video track", () => logOf(bob), (l) => l.filter((x) => x === "track:alice:video").length >= 2);

  // Replacing a track (a camera switch) needs no renegotiation; video keeps flowing.
  const bobFramesBeforeSwap = await frames(bob);
  expect(await call<boolean>(alice, "replaceCamera"), "every sender carries the new track").toBe(true);
  await waitFor("bob decodes alice's video after the swap", () => frames(bob), (n) => n > bobFramesBeforeSwap + 20);

  // Bob's realtime connection drops: he reconnects, re-attaches and restarts ICE; video goes on.
  const ufragsBefore = await call<string[]>(bob, "ufrags");
  const aliceFramesBefore = await frames(alice);
  await call(bob, "reconnect");
  await waitFor("bob's call is active again", () => logOf(bob), (l) => l.includes("call:reconnecting") && l.at(-1) !== "call:reconnecting" && l.includes("call:active"));
  await waitFor("alice sees bob reconnect", () => logOf(alice), (l) => l.includes("reconnected:bob"));
  await waitFor("bob restarted ICE (new ufrag)", () => call<string[]>(bob, "ufrags"), (u) => u.length === 1 && u[0] !== ufragsBefore[0]);
  await waitFor("alice decodes bob's video after the restart", () => frames(alice), (n) => n > aliceFramesBefore + 20);

  // Leaving closes the peer on the other side.
  await call(bob, "leave");
  await waitFor("alice sees bob leave", () => logOf(alice), (l) => l.includes("left:bob:left"));
  expect(await call<string[]>(alice, "peers")).toEqual([]);

  const errors = [...(await logOf(alice)), ...(await logOf(bob))].filter((l) => l.startsWith("error:"));
  expect(errors, "no negotiation errors on either side").toEqual([]);
});

it("three browsers form a mesh: each decodes both others, roles follow join order, a manual ICE restart keeps media", { timeout: 120_000 }, async () => {
  const tokens = { alice: await server.token("alice"), bob: await server.token("bob"), carol: await server.token("carol") };
  const channel = await new RestClient({ baseUrl: server.url, token: tokens.alice }).createChannel({
    kind: "channel",
    name: "mesh",
    members: ["bob", "carol"],
  });
  const [alice, bob, carol] = [await person(), await person(), await person()];
  const a = await call<Promise<{ callId: string }>>(alice, "start", { url: server.url, token: tokens.alice, channelId: channel.id });
  await call(bob, "start", { url: server.url, token: tokens.bob, callId: a.callId });
  await call(carol, "start", { url: server.url, token: tokens.carol, callId: a.callId });

  const perPeer = (page: Page) => call<Record<string, number>>(page, "framesPerPeer");
  const both = (names: string[]) => (f: Record<string, number>) => names.every((n) => (f[n] ?? 0) > 5);
  await waitFor("alice decodes bob and carol", () => perPeer(alice), both(["bob", "carol"]), 40_000);
  await waitFor("bob decodes alice and carol", () => perPeer(bob), both(["alice", "carol"]), 40_000);
  await waitFor("carol decodes alice and bob", () => perPeer(carol), both(["alice", "bob"]), 40_000);
  // Roles: the earlier joiner of each pair is impolite.
  expect((await call<string[]>(bob, "peers")).map((p) => p.split(":").slice(0, 2).join(":")).sort()).toEqual(["alice:polite", "carol:impolite"]);
  expect((await call<string[]>(carol, "peers")).map((p) => p.split(":").slice(0, 2).join(":")).sort()).toEqual(["alice:polite", "bob:polite"]);

  const before = await call<string[]>(alice, "ufrags");
  const framesBefore = await perPeer(bob);
  await call(alice, "restartIce");
  await waitFor("alice's ufrags all changed", () => call<string[]>(alice, "ufrags"), (u) => u.length === 2 && u.every((x) => !before.includes(x)));
  await waitFor("bob still decodes alice after the restart", () => perPeer(bob), (f) => (f.alice ?? 0) > (framesBefore.alice ?? 0) + 10);

  const errors = [...(await logOf(alice)), ...(await logOf(bob)), ...(await logOf(carol))].filter((l) => l.startsWith("error:"));
  expect(errors, "no negotiation errors").toEqual([]);
  for (const page of [alice, bob, carol]) await call(page, "close");
});
