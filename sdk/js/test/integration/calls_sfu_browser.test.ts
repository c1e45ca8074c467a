/**
 * SFU calls for real: three Chromium pages (fake camera and microphone) use the built SDK against
 * a real `parley serve` with its in-process SFU and an escalation threshold of 3. Two people start
 * peer to peer; the third join escalates the call, and every `CallSession` moves its media to the
 * SFU by itself: one RTCPeerConnection each, video published with three simulcast encodings, every
 * page decoding both others through the SFU, the P2P connections closed. Then subscription
 * management (unsubscribe / subscribe, pause / resume, a size limit), a re-offer for more receive
 * slots, the active speaker, and a leave after which the others keep decoding.
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
let server: TestServer;
let browser: Browser;

beforeAll(async () => {
  webDir = mkdtempSync(join(tmpdir(), "parley-sdk-js-sfu-"));
  copyFileSync(dist, join(webDir, "sdk.js"));
  copyFileSync(pageScript, join(webDir, "call-page.js"));
  writeFileSync(
    join(webDir, "index.html"),
    `<!doctype html><meta charset="utf-8"><title>loading</title><script type="module" src="/call-page.js"></script>`,
  );
  server = await startServer(["--web-dir", webDir, ...SFU_FLAGS]);
  const args = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required", // the speaking page's AudioContext starts without a click
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

/**
 * Cameras at 640×480, large enough for Chromium to send two simulcast layers (it sends fewer
 * than asked for small captures). One fake camera is shared by all pages of the browser, at the
 * size the first page opened it with, so every page asks for the same.
 */
const VGA = { width: 640, height: 480 };

/** The in-process SFU on loopback only, and escalation at the third participant. */
const SFU_FLAGS = ["--sfu-listen", "127.0.0.1:0", "--sfu-threshold", "3"];

async function person(): Promise<Page> {
  const context = await browser.newContext();
  await context.grantPermissions(["camera", "microphone"], { origin: server.url });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await page.goto(server.url);
  await page.waitForFunction(() => document.title === "ready");
  return page;
}

const logOf = (page: Page) => page.evaluate(() => (window as unknown as { harness: { log: string[] } }).harness.log);
const call = <T>(page: Page, fn: string, arg?: unknown) =>
  page.evaluate(([f, a]) => (window as unknown as { harness: Record<string, (x: unknown) => T> }).harness[f as string]!(a), [fn, arg] as const);
const sfuFrames = (page: Page) => call<Record<string, number>>(page, "sfuFramesPerPeer") as unknown as Promise<Record<string, number>>;

async function waitFor<T>(what: string, read: () => Promise<T>, check: (v: T) => boolean, timeoutMs = 30_000): Promise<T> {
  let last: T | undefined;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    last = await read();
    if (check(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Frames decoded from `user` rise by more than `by` (read through the SFU connection). */
async function keepsDecoding(page: Page, who: string, user: string, by = 10, timeoutMs = 30_000): Promise<void> {
  const before = (await sfuFrames(page))[user] ?? 0;
  await waitFor(`${who} decodes more of ${user}'s video through the SFU`, () => sfuFrames(page), (f) => (f[user] ?? 0) > before + by, timeoutMs);
}

it(
  "a P2P call escalates to the SFU at the third join: media moves by itself, simulcast, subscriptions, active speaker, leave",
  { timeout: 240_000 },
  async () => {
    const tokens = { alice: await server.token("alice"), bob: await server.token("bob"), carol: await server.token("carol") };
    const channel = await new RestClient({ baseUrl: server.url, token: tokens.alice }).createChannel({
      kind: "channel",
      name: "sfu",
      members: ["bob", "carol"],
    });
    const [alice, bob, carol] = [await person(), await person(), await person()];
    const pages = { alice, bob, carol };
    try {
      // ---- two people: peer to peer ----
      const a = await call<Promise<{ callId: string }>>(alice, "start", { url: server.url, token: tokens.alice, channelId: channel.id, size: VGA });
      // Bob sends a steady tone: he is the one speaking.
      await call(bob, "start", { url: server.url, token: tokens.bob, callId: a.callId, tone: true, size: VGA });
      expect(await call<string>(alice, "mode")).toBe("p2p");
      await waitFor("alice and bob connect peer to peer", () => call<string[]>(alice, "peers"), (p) => p.some((x) => x.endsWith(":connected")));

      // ---- the third join escalates; carol opens only one slot per kind, so she must re-offer ----
      await call(carol, "start", { url: server.url, token: tokens.carol, callId: a.callId, sfu: { slots: { audio: 1, video: 1 } }, size: VGA });
      expect(await call<string>(carol, "mode"), "the join that crosses the threshold answers in sfu mode").toBe("sfu");
      for (const [name, page] of Object.entries(pages)) {
        await waitFor(`${name}'s call is in sfu mode`, () => call<string>(page, "mode"), (m) => m === "sfu");
      }
      const others = { alice: ["bob", "carol"], bob: ["alice", "carol"], carol: ["alice", "bob"] } as const;
      for (const [name, page] of Object.entries(pages)) {
        const want = others[name as keyof typeof others];
        await waitFor(`${name} decodes ${want.join(" and ")} through the SFU`, () => sfuFrames(page), (f) => want.every((u) => (f[u] ?? 0) > 10), 60_000);
        await waitFor(`${name}'s P2P connections are closed`, () => call<number>(page, "openP2P"), (n) => n === 0);
      }
      // Carol opened one slot per kind; the SFU asked for one more each and she offered again.
      expect(await call<{ audio: number; video: number }>(carol, "sfuSlots")).toEqual({ audio: 2, video: 2 });
      expect(await logOf(alice)).toContain("mode:sfu");
      expect(await logOf(alice)).toContain("sfu:connected");
      // Simulcast: the camera goes to the SFU as three encodings, lowest first.
      expect(await call<string[]>(alice, "sfuSendRids")).toEqual(["q", "h", "f"]);

      // ---- unsubscribe / subscribe ----
      expect((await call<string[]>(alice, "remoteTracks")).sort()).toEqual(
        expect.arrayContaining([expect.stringMatching(/^bob:video:true:/), expect.stringMatching(/^carol:video:true:/), expect.stringMatching(/^bob:audio:true:/)]),
      );
      const removedBefore = (await logOf(alice)).filter((l) => l === "track.removed:bob:video").length;
      await call(alice, "unsubscribe", { user: "bob", kind: "video" });
      await waitFor("alice's slot for bob's video is unbound", () => logOf(alice), (l) => l.filter((x) => x === "track.removed:bob:video").length > removedBefore);
      expect(await call<string[]>(alice, "remoteTracks")).toContain("bob:video:false:-");
      const tracksBefore = (await logOf(alice)).filter((l) => l === "track:bob:video").length;
      await call(alice, "subscribe", { user: "bob", kind: "video" });
      await waitFor("bob's video is bound to a slot of alice again", () => logOf(alice), (l) => l.filter((x) => x === "track:bob:video").length > tracksBefore);
      await keepsDecoding(alice, "alice", "bob");

      // ---- pause / resume, and a size limit ----
      await call(alice, "setVideo", { user: "carol", prefs: { paused: true } });
      await new Promise((r) => setTimeout(r, 1_000)); // frames in flight at the pause
      const paused = (await sfuFrames(alice)).carol ?? 0;
      await new Promise((r) => setTimeout(r, 2_000));
      const stillPaused = (await sfuFrames(alice)).carol ?? 0;
      expect(stillPaused - paused, "no video of carol reaches alice while paused").toBeLessThanOrEqual(2);
      await call(alice, "setVideo", { user: "carol", prefs: { paused: false, maxSize: { width: 160, height: 120 } } });
      await keepsDecoding(alice, "alice (resumed)", "carol");
      // A 160×120 tile gets carol's lowest layer (q: 160×120); a large one her highest sent (h).
      await waitFor("the SFU to send alice carol's q layer for a 160×120 tile", () => call<string | null | undefined>(alice, "layerOf", { user: "carol" }), (l) => l === "q");
      await call(alice, "setVideo", { user: "carol", prefs: { maxSize: { width: 1280, height: 720 } } });
      await waitFor("the SFU to switch alice to a higher layer of carol for a large tile", () => call<string | null | undefined>(alice, "layerOf", { user: "carol" }), (l) => l === "h" || l === "f");
      await keepsDecoding(alice, "alice (after the layer switch)", "carol");

      // ---- active speaker: the SFU announces bob (the only one speaking) to everyone ----
      for (const [name, page] of Object.entries(pages)) {
        const expected = name === "bob" ? "me" : "bob";
        await waitFor(`${name} to see bob as the active speaker`, () => call<string | null>(page, "activeSpeaker"), (s) => s === expected);
      }

      // ---- bob leaves; alice and carol keep decoding each other ----
      await call(bob, "leave");
      await waitFor("alice sees bob leave", () => logOf(alice), (l) => l.includes("left:bob:left"));
      await waitFor("alice's slots for bob are freed", () => logOf(alice), (l) => l.includes("track.removed:bob:video") && l.lastIndexOf("track.removed:bob:video") > l.lastIndexOf("track:bob:video"));
      await keepsDecoding(alice, "alice", "carol");
      await keepsDecoding(carol, "carol", "alice");

      const errors = [...(await logOf(alice)), ...(await logOf(bob)), ...(await logOf(carol))].filter((l) => l.startsWith("error:"));
      expect(errors, "no negotiation errors").toEqual([]);
    } catch (e) {
      for (const [name, page] of Object.entries(pages)) console.log(`${name}: ${JSON.stringify(await logOf(page).catch(() => []))}`);
      for (const [name, page] of Object.entries(pages)) console.log(`${name} sends: ${JSON.stringify(await call(page, "sentLayers").catch(() => []))}`);
      console.log(server.logs().slice(-4000));
      throw e;
    } finally {
      for (const page of [alice, bob, carol]) await call(page, "close").catch(() => {});
    }
  },
);
