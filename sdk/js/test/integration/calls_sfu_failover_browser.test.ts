/**
 * SFU failover with real browsers: a core without an SFU of its own (`--no-sfu --sfu-always`) and
 * two `parley serve --role sfu` processes on NATS. Two Chromium pages decode each other through
 * the SFU that holds the call; it is killed with SIGKILL; the core moves the call to the other
 * SFU (`call.mode_changed` with a new `sfu_session`, reason `sfu_failover`) and each
 * `CallSession` moves by itself (joins again for a credential, opens a new SFU connection): both
 * decode each other again within 10 s of the kill. Needs NATS: PARLEY_TEST_NATS_URL
 * (scripts/test.sh starts it).
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
const NATS = process.env.PARLEY_TEST_NATS_URL;
const SECRET = "sdk-js-failover-secret";
const dist = fileURLToPath(new URL("../../dist/index.js", import.meta.url));
const pageScript = fileURLToPath(new URL("./browser/call-page.js", import.meta.url));

let webDir: string | undefined;
let core: TestServer;
const sfus: TestServer[] = [];
let browser: Browser;

beforeAll(async () => {
  if (!NATS) {
    throw new Error("PARLEY_TEST_NATS_URL is not set: run sdk/js through scripts/test.sh, or start the services first: eval \"$(scripts/services.sh start)\"");
  }
  webDir = mkdtempSync(join(tmpdir(), "parley-sdk-js-failover-"));
  copyFileSync(dist, join(webDir, "sdk.js"));
  copyFileSync(pageScript, join(webDir, "call-page.js"));
  writeFileSync(join(webDir, "index.html"), `<!doctype html><meta charset="utf-8"><title>loading</title><script type="module" src="/call-page.js"></script>`);
  for (let i = 0; i < 2; i++) sfus.push(await startServer(["--role", "sfu", "--nats-url", NATS, "--sfu-secret", SECRET]));
  core = await startServer(["--web-dir", webDir, "--dev", "--nats-url", NATS, "--no-sfu", "--sfu-always", "--sfu-secret", SECRET]);
  const args = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--mute-audio",
  ];
  if (process.getuid?.() === 0) args.push("--no-sandbox");
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args, timeout: 30_000 });
  await new Promise((r) => setTimeout(r, 1_500)); // the SFUs announce themselves every 500 ms
}, 90_000);

afterAll(async () => {
  await browser?.close().catch(() => {});
  await core?.stop();
  for (const s of sfus) await s.stop();
  if (webDir) rmSync(webDir, { recursive: true, force: true });
});

async function person(): Promise<Page> {
  const context = await browser.newContext();
  await context.grantPermissions(["camera", "microphone"], { origin: core.url });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  await page.goto(core.url);
  await page.waitForFunction(() => document.title === "ready");
  return page;
}

const logOf = (page: Page) => page.evaluate(() => (window as unknown as { harness: { log: string[] } }).harness.log);
const call = <T>(page: Page, fn: string, arg?: unknown) =>
  page.evaluate(([f, a]) => (window as unknown as { harness: Record<string, (x: unknown) => T> }).harness[f as string]!(a), [fn, arg] as const);
const sfuFrames = (page: Page) => call<Record<string, number>>(page, "sfuFramesPerPeer") as unknown as Promise<Record<string, number>>;

async function waitFor<T>(what: string, read: () => Promise<T>, check: (v: T) => boolean, timeoutMs: number): Promise<T> {
  let last: T | undefined;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    last = await read();
    if (check(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}; last value: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

it("when the call's SFU process dies, both sessions move to the other SFU by themselves and decode again within 10 s", { timeout: 120_000 }, async () => {
  const tokens = { alice: await core.token("alice"), bob: await core.token("bob") };
  const channel = await new RestClient({ baseUrl: core.url, token: tokens.alice }).createChannel({ kind: "channel", name: "failover", members: ["bob"] });
  const [alice, bob] = [await person(), await person()];
  try {
    const a = await call<Promise<{ callId: string }>>(alice, "start", { url: core.url, token: tokens.alice, channelId: channel.id });
    await call(bob, "start", { url: core.url, token: tokens.bob, callId: a.callId });
    expect(await call<string>(alice, "mode"), "--sfu-always: the call starts on the SFU").toBe("sfu");
    await waitFor("alice decodes bob through the SFU", () => sfuFrames(alice), (f) => (f.bob ?? 0) > 10, 30_000);
    await waitFor("bob decodes alice through the SFU", () => sfuFrames(bob), (f) => (f.alice ?? 0) > 10, 30_000);

    // Which SFU holds the call: the one with two participants.
    let holder: TestServer | undefined;
    for (const s of sfus) {
      const status = (await (await fetch(`${s.url}/v1/sfu`)).json()) as { participants?: number };
      if (status.participants === 2) holder = s;
    }
    expect(holder, "one SFU holds the call's two participants").toBeDefined();
    const connectedBefore = (await logOf(alice)).filter((l) => l === "sfu:connected").length;
    holder!.signal("SIGKILL");
    const killed = Date.now();

    // Each session gets a new SFU connection (a second `connected`) and decodes again; a new
    // connection's stats start from zero, so any frames counted now came through the new SFU.
    for (const [name, page, other] of [["alice", alice, "bob"], ["bob", bob, "alice"]] as const) {
      await waitFor(`${name}'s new SFU connection`, () => logOf(page), (l) => l.filter((x) => x === "sfu:connected").length > connectedBefore, 10_000 - (Date.now() - killed));
      await waitFor(`${name} decodes ${other} through the new SFU`, () => sfuFrames(page), (f) => (f[other] ?? 0) > 5, Math.max(1_000, 10_000 - (Date.now() - killed)));
    }
    console.log(`media decoded again ${Date.now() - killed} ms after the kill`);
    const errors = [...(await logOf(alice)), ...(await logOf(bob))].filter((l) => l.startsWith("error:"));
    expect(errors, "no call errors").toEqual([]);
  } catch (e) {
    for (const [name, page] of [["alice", alice], ["bob", bob]] as const) console.log(`${name}: ${JSON.stringify(await logOf(page).catch(() => []))}`);
    console.log(core.logs().slice(-3000));
    throw e;
  } finally {
    for (const page of [alice, bob]) await call(page, "close").catch(() => {});
  }
});
