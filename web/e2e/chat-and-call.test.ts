/**
 * Two people (two browser contexts) use the web client served by a real `parley serve`:
 * messages, typing, read receipts, unread counts, history paging and presence; then a video call
 * in which each side decodes the other's video; then one side's network connection to the
 * server is reset for real (a TCP proxy in front of the server drops every connection of Bob's
 * page), Bob's client reconnects, the call restarts ICE, and video goes on. Screenshots of each
 * stage go to the artefact folder.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { artifactsDir, screenshot, webDir } from "./harness/artifacts.js";
import { launchChromium, logPageErrors, newContext } from "./harness/browser.js";
import { startProxy, type TcpProxy } from "./harness/proxy.js";
import { startServer, type ParleyServer } from "./harness/server.js";
import { watchSignals, type SignalLog } from "./harness/signals.js";
import { waitFor } from "./harness/wait.js";
import { droppedCandidates, framesDecodedIn, installLoopbackWebRTC, remoteIceUfrags } from "./harness/webrtc.js";

const out = artifactsDir("chat-and-call");
const log = (line: string) => console.log(`# ${line}`);

let server: ParleyServer;
let proxy: TcpProxy;
let browser: Browser;

before(async () => {
  server = await startServer({
    webDir: join(webDir, "dist"),
    logDir: out,
    // Quick offline after the last connection; a call participant waits long for a reconnect.
    args: ["--presence-grace-ms", "1000", "--call-reconnect-grace-ms", "30000"],
  });
  proxy = await startProxy(server.port);
  browser = await launchChromium();
});

after(async () => {
  await browser?.close().catch(() => {});
  await proxy?.close().catch(() => {});
  await server?.stop();
});

interface Person {
  name: string;
  context: BrowserContext;
  page: Page;
  signals: SignalLog;
}

async function open(name: string, origin: string): Promise<Person> {
  const context = await newContext(browser, origin);
  await context.addInitScript(installLoopbackWebRTC);
  const page = await context.newPage();
  logPageErrors(page, name, log);
  const signals = watchSignals(page);
  await page.goto(origin);
  return { name, context, page, signals };
}

async function signIn(p: Person): Promise<void> {
  await p.page.getByLabel("User id").fill(p.name);
  await p.page.getByRole("button", { name: "Sign in" }).click();
  await p.page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
}

function conversationButton(p: Person, label: RegExp) {
  return p.page.getByRole("navigation", { name: "Conversations" }).getByRole("button", { name: label });
}

async function text(page: Page, selector: string): Promise<string> {
  return (await page.locator(selector).textContent({ timeout: 2_000 })) ?? "";
}

test("two people chat, call with video, and the call survives a reset connection", { timeout: 240_000 }, async () => {
  const alice = await open("alice", server.origin);
  // Bob reaches the server through the proxy, so his connections can be cut.
  const bob = await open("bob", `http://localhost:${proxy.port}`);
  try {
    await scenario(alice, bob);
  } catch (e) {
    for (const p of [alice, bob]) if (!p.page.isClosed()) await screenshot(p.page, out, `failure-${p.name}`).catch(() => {});
    throw e;
  }
});

async function scenario(alice: Person, bob: Person): Promise<void> {

  // ---- sign in ----
  await alice.page.getByLabel("User id").fill("alice");
  await screenshot(alice.page, out, "01-sign-in");
  await signIn(alice);
  await signIn(bob);

  // ---- a DM, created by Alice; Bob finds it in his list ----
  await alice.page.getByRole("button", { name: "New direct message" }).click();
  await alice.page.getByRole("dialog").getByLabel("User id").fill("bob");
  await alice.page.getByRole("dialog").getByRole("button", { name: "Open conversation" }).click();
  await alice.page.getByRole("heading", { name: "bob" }).waitFor({ timeout: 10_000 });
  await conversationButton(bob, /Direct message with alice/).waitFor({ timeout: 15_000 });

  // ---- presence: each sees the other online ----
  await waitFor("Alice to see Bob online", async () => (await alice.page.locator("#dm-list .presence[data-user-id=bob]").getAttribute("data-status")) === "online", { timeoutMs: 10_000 });
  await waitFor("Bob to see Alice online", async () => (await bob.page.locator("#dm-list .presence[data-user-id=alice]").getAttribute("data-status")) === "online", { timeoutMs: 10_000 });

  // ---- typing: Bob opens the DM, Alice types, Bob sees it ----
  await conversationButton(bob, /Direct message with alice/).click();
  await alice.page.getByLabel("Message bob").pressSequentially("Hello B", { delay: 20 });
  await waitFor("Bob to see Alice typing", async () => (await text(bob.page, "#typing-indicator")).includes("alice is typing"), { timeoutMs: 10_000 });
  await screenshot(bob.page, out, "02-bob-sees-alice-typing");

  // ---- a message, and its read receipt ----
  await alice.page.getByLabel("Message bob").pressSequentially("ob!", { delay: 20 });
  await alice.page.getByLabel("Message bob").press("Enter");
  await bob.page.locator("#message-list li", { hasText: "Hello Bob!" }).waitFor({ timeout: 10_000 });
  await waitFor("Bob's typing line to clear when the message arrives", async () => (await text(bob.page, "#typing-indicator")) === "", { timeoutMs: 10_000 });
  await waitFor("Alice to see \"Seen by bob\"", async () => (await text(alice.page, "#message-list")).includes("Seen by bob"), { timeoutMs: 10_000 });
  await screenshot(alice.page, out, "03-alice-sees-read-receipt");

  await bob.page.getByLabel("Message alice").fill("Hi Alice, good to see you");
  await bob.page.getByRole("button", { name: "Send" }).click();
  await alice.page.locator("#message-list li", { hasText: "Hi Alice, good to see you" }).waitFor({ timeout: 10_000 });
  await waitFor("Bob to see \"Seen by alice\"", async () => (await text(bob.page, "#message-list")).includes("Seen by alice"), { timeoutMs: 10_000 });

  // ---- a channel with Bob added as a member; unread counts; paging back through history ----
  await alice.page.getByRole("button", { name: "New channel" }).click();
  await alice.page.getByRole("dialog").getByLabel("Channel name").fill("general");
  await alice.page.getByRole("dialog").getByRole("button", { name: "Create channel" }).click();
  await alice.page.getByRole("heading", { name: "# general" }).waitFor({ timeout: 10_000 });
  await alice.page.getByRole("button", { name: "Add member" }).click();
  await alice.page.getByRole("dialog").getByLabel("User id").fill("bob");
  await alice.page.getByRole("dialog").getByRole("button", { name: "Add member" }).click();
  await alice.page.locator(".conversation-head .members li[data-user-id=bob]").waitFor({ timeout: 10_000 });
  const composer = alice.page.getByLabel("Message #general");
  for (let i = 1; i <= 60; i++) {
    await composer.fill(`history message ${i}`);
    await composer.press("Enter");
  }
  await alice.page.locator("#message-list li", { hasText: "history message 60" }).waitFor({ timeout: 20_000 });
  await waitFor("Alice's 60 messages to be acknowledged", async () => (await alice.page.locator("#message-list li.pending").count()) === 0, { timeoutMs: 30_000 });
  const general = conversationButton(bob, /Channel general/);
  await waitFor("Bob to see 60 unread in general", async () => (await general.getAttribute("aria-label"))?.includes("60 unread"), { timeoutMs: 20_000 });
  await screenshot(bob.page, out, "04-bob-sees-unread-count");
  // Bob's page heard of the channel at once (channel.added) and received the 60 messages live. A
  // reload starts from the server's state, so the conversation opens on its newest page.
  await bob.page.reload();
  await bob.page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  await waitFor("Bob to see 60 unread in general after a reload", async () => (await general.getAttribute("aria-label"))?.includes("60 unread"), { timeoutMs: 15_000 });
  await general.click();
  await bob.page.locator("#message-list li", { hasText: "history message 60" }).waitFor({ timeout: 10_000 });
  assert.equal(await bob.page.locator("#message-list li", { hasText: "history message 1" }).filter({ hasText: /message 1$/ }).count(), 0, "the first page holds the newest 50 messages only");
  await bob.page.getByRole("button", { name: "Load earlier messages" }).waitFor({ timeout: 10_000 });
  // Scrolling to the top of the list pages back (the button does the same for keyboard users).
  await bob.page.locator(".messages").evaluate((el) => el.scrollTo(0, 0));
  await bob.page.locator("#message-list li .text", { hasText: /^history message 1$/ }).waitFor({ timeout: 10_000 });
  assert.equal(await bob.page.locator("#message-list li").count(), 60);
  await waitFor("general to be read on Bob's side", async () => !(await general.getAttribute("aria-label"))?.includes("unread"), { timeoutMs: 10_000 });
  await screenshot(bob.page, out, "05-bob-paged-back-through-history");

  // ---- a video call in the DM ----
  await conversationButton(alice, /Direct message with bob/).click();
  await conversationButton(bob, /Direct message with alice/).click();
  await alice.page.getByRole("button", { name: "Start call" }).click();
  await alice.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 15_000 });
  // Bob's page rings; he declines, then joins from the conversation's header after all.
  const ringing = bob.page.getByRole("dialog", { name: "Incoming call" });
  await ringing.waitFor({ timeout: 10_000 });
  await ringing.getByRole("button", { name: "Decline" }).click();
  await ringing.waitFor({ state: "detached", timeout: 5_000 });
  await bob.page.getByRole("button", { name: /Join call \(1 in call\)/ }).click();
  await bob.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 15_000 });
  for (const p of [alice, bob]) {
    await p.page.locator("#call-tiles figure:not([data-local]) video").waitFor({ timeout: 15_000 });
  }
  const decoding = async (p: Person, what: string, from: number) =>
    waitFor(`${p.name} to decode 30 more video frames ${what}`, async () => {
      const frames = await framesDecodedIn(p.page);
      return frames >= from + 30 ? frames : false;
    }, { timeoutMs: 30_000, intervalMs: 250 });
  const aliceFrames = await decoding(alice, "from Bob", 0);
  const bobFrames = await decoding(bob, "from Alice", 0);
  log(`frames decoded: alice ${aliceFrames}, bob ${bobFrames}`);
  await screenshot(alice.page, out, "06-alice-in-call");
  await screenshot(bob.page, out, "07-bob-in-call");

  // ---- Bob's connection is reset for real; his client reconnects and the call restarts ICE ----
  const ufragsBefore = { alice: await remoteIceUfrags(alice.page), bob: await remoteIceUfrags(bob.page) };
  assert.equal(ufragsBefore.alice.length, 1, "Alice has one open peer connection");
  assert.equal(ufragsBefore.bob.length, 1, "Bob has one open peer connection");
  const socketsBefore = bob.signals.sockets;
  const attachesBefore = bob.signals.sentTypes.get("call.attach") ?? 0;
  const cutAt = Date.now();
  const cut = proxy.resetAll();
  log(`reset ${cut} proxied connections of Bob's page`);
  assert.ok(cut > 0, "Bob's page had connections through the proxy");
  await waitFor("Bob's page to open a new WebSocket", () => bob.signals.sockets > socketsBefore, { timeoutMs: 20_000 });
  await bob.page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 20_000 });
  await waitFor("Bob's client to attach to the call again", () => (bob.signals.sentTypes.get("call.attach") ?? 0) > attachesBefore, { timeoutMs: 20_000 });
  await waitFor(
    "an offer with ice_restart after the reconnect",
    () => [...alice.signals.signals, ...bob.signals.signals].some((s) => s.kind === "offer" && s.iceRestart && s.at > cutAt && s.direction === "sent"),
    { timeoutMs: 20_000 },
  );
  await waitFor(
    "the answer to the ICE restart",
    () => [...alice.signals.signals, ...bob.signals.signals].some((s) => s.kind === "answer" && s.at > cutAt && s.direction === "sent"),
    { timeoutMs: 20_000 },
  );
  for (const p of [alice, bob]) {
    const before = ufragsBefore[p.name as "alice" | "bob"][0];
    await waitFor(`${p.name}'s peer connection to apply the restarted ICE credentials of the other side`, async () => {
      const now = await remoteIceUfrags(p.page);
      return now.length === 1 && now[0] !== "" && now[0] !== before;
    }, { timeoutMs: 20_000 });
  }
  const aliceAfter = await decoding(alice, "after Bob's reconnect", await framesDecodedIn(alice.page));
  const bobAfter = await decoding(bob, "after his reconnect", await framesDecodedIn(bob.page));
  log(`frames decoded after the reconnect: alice ${aliceAfter}, bob ${bobAfter}`);
  await bob.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 10_000 });
  await screenshot(alice.page, out, "08-alice-after-bob-reconnected");
  await screenshot(bob.page, out, "09-bob-after-reconnect");

  // ---- only 127.0.0.1 candidates were ever signalled ----
  for (const p of [alice, bob]) {
    assert.deepEqual(p.signals.nonLoopback, [], `${p.name} signalled non-loopback candidates`);
    log(`${p.name}: ${(await droppedCandidates(p.page)).length} non-loopback candidates kept in the browser`);
  }

  // ---- Bob closes the app: Alice sees him go offline ----
  await bob.context.close();
  await waitFor("Alice to see Bob offline", async () => (await alice.page.locator("#dm-list .presence[data-user-id=bob]").getAttribute("data-status")) === "offline", { timeoutMs: 15_000 });
  await screenshot(alice.page, out, "10-alice-sees-bob-offline");
  await alice.context.close();
}
