/**
 * What a chat user expects beyond sending messages, each against a real `parley serve`:
 * the favicon, channels of the same name told apart, editing and deleting your own messages with
 * the keyboard shortcuts, "Seen by" never under a person's own message, the members dialog within
 * each role, the narrow (phone) layout, and calls that ring, announce joins and leaves, and end as
 * missed calls when nobody answers. Screenshots of each stage go to the artefact folder.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { artifactsDir, screenshot, webDir } from "./harness/artifacts.js";
import { launchChromium, logPageErrors, newContext } from "./harness/browser.js";
import { startServer, type ParleyServer } from "./harness/server.js";
import { waitFor } from "./harness/wait.js";
import { installLoopbackWebRTC } from "./harness/webrtc.js";

const out = artifactsDir("chat-features");
const log = (line: string) => console.log(`# ${line}`);

/** How long calls ring, and how long a DM caller waits before "No answer", in these tests. */
const RING_MS = 6_000;

let server: ParleyServer;
let browser: Browser;
const contexts: BrowserContext[] = [];

before(async () => {
  server = await startServer({ webDir: join(webDir, "dist"), logDir: out, args: ["--presence-grace-ms", "1000"] });
  browser = await launchChromium();
});

after(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  await browser?.close().catch(() => {});
  await server?.stop();
});

interface Person {
  name: string;
  page: Page;
}

/** Opens the app in a fresh context (its own sign-in) and signs in as `name`. */
async function signedIn(name: string, viewport?: { width: number; height: number }): Promise<Person> {
  const context = viewport
    ? await browser.newContext({ viewport })
    : await newContext(browser, server.origin);
  if (viewport) {
    await context.grantPermissions(["camera", "microphone"], { origin: server.origin });
    context.setDefaultTimeout(15_000);
  }
  contexts.push(context);
  await context.addInitScript(installLoopbackWebRTC);
  await context.addInitScript((ms: number) => localStorage.setItem("parley.ringTimeoutMs", String(ms)), RING_MS);
  const page = await context.newPage();
  logPageErrors(page, name, log);
  await page.goto(server.origin);
  await page.getByLabel("User id").fill(name);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  return { name, page };
}

function sidebar(p: Person) {
  return p.page.getByRole("navigation", { name: "Conversations" });
}

async function openDm(p: Person, other: string): Promise<void> {
  await p.page.getByRole("button", { name: "New direct message" }).click();
  await p.page.getByRole("dialog").getByLabel("User id").fill(other);
  await p.page.getByRole("dialog").getByRole("button", { name: "Open conversation" }).click();
  await p.page.getByRole("heading", { name: other, exact: true }).waitFor({ timeout: 10_000 });
}

async function createChannel(p: Person, name: string, members: string[] = []): Promise<void> {
  await p.page.getByRole("button", { name: "New channel" }).click();
  await p.page.getByRole("dialog").getByLabel("Channel name").fill(name);
  if (members.length > 0) await p.page.getByRole("dialog").getByLabel("Members (optional)").fill(members.join(", "));
  await p.page.getByRole("dialog").getByRole("button", { name: "Create channel" }).click();
  await p.page.locator("dialog").waitFor({ state: "detached", timeout: 10_000 });
}

/** The list row of a message, by its exact text. */
function row(p: Person, text: string) {
  return p.page.locator("#message-list li.message").filter({ has: p.page.locator(".text", { hasText: new RegExp(`^${escape(text)}$`) }) });
}

function escape(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

async function onFailure(people: Person[], name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (e) {
    for (const p of people) if (!p.page.isClosed()) await screenshot(p.page, out, `failure-${name}-${p.name}`).catch(() => {});
    throw e;
  }
}

test("the favicon is served, and loading the app asks for nothing that is missing", { timeout: 60_000 }, async () => {
  const res = await fetch(`http://127.0.0.1:${server.port}/favicon.ico`);
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-type"), "image/x-icon");
  const ico = Buffer.from(await res.arrayBuffer());
  assert.deepEqual([...ico.subarray(0, 6)], [0, 0, 1, 0, 1, 0], "an ICO header with one image");

  const context = await newContext(browser, server.origin);
  contexts.push(context);
  const page = await context.newPage();
  const failed: string[] = [];
  page.on("response", (r) => {
    if (r.status() >= 400) failed.push(`${r.status()} ${r.url()}`);
  });
  await page.goto(server.origin);
  await page.getByLabel("User id").waitFor();
  // The icon the page declares, and /favicon.ico, both decode as images.
  const sizes = await page.evaluate(async () => {
    const load = (src: string) =>
      new Promise<number>((resolve, reject) => {
        const img = new Image();
        img.onload = () => resolve(img.naturalWidth);
        img.onerror = () => reject(new Error(`${src} does not decode`));
        img.src = src;
      });
    const declared = document.querySelector<HTMLLinkElement>("link[rel=icon]")?.href ?? "";
    return [await load(declared), await load("/favicon.ico")];
  });
  assert.deepEqual(sizes.map((s) => s > 0), [true, true]);
  await page.setContent(`<body style="background:#fff"><img src="${server.origin}/favicon.ico" width="128" style="image-rendering:pixelated"><img src="${server.origin}/favicon.svg" width="128"></body>`);
  await page.locator("img").nth(1).evaluate((img: HTMLImageElement) => img.decode());
  await screenshot(page, out, "01-favicon-ico-and-svg");
  assert.deepEqual(failed, [], "no request of the page failed");
});

test("two channels with the same name are told apart by their members", { timeout: 60_000 }, async () => {
  const nia = await signedIn("nia");
  await onFailure([nia], "twins", async () => {
    await createChannel(nia, "general", ["oto"]);
    await createChannel(nia, "general", ["pia", "quin"]);
    const withOto = sidebar(nia).getByRole("button", { name: "Channel general (with oto)" });
    const withPiaQuin = sidebar(nia).getByRole("button", { name: "Channel general (with pia, quin)" });
    await withOto.waitFor({ timeout: 10_000 });
    await withPiaQuin.waitFor({ timeout: 10_000 });
    assert.equal(await sidebar(nia).locator("#channel-list .twin").count(), 2);
    await withOto.click();
    await waitFor("the header to say which general this is", async () => (await nia.page.locator("#conversation-twin").textContent()) === "with oto · created by nia", { timeoutMs: 5_000 });
    await screenshot(nia.page, out, "02-two-generals-told-apart");
    // A third "general" with the same members as the first: the end of the id tells them apart.
    await createChannel(nia, "general", ["oto"]);
    await waitFor("three generals, all labelled differently", async () => {
      const labels = await sidebar(nia).locator("#channel-list button.conversation").evaluateAll((els) => els.map((e) => e.getAttribute("aria-label")));
      return labels.length === 3 && new Set(labels).size === 3 ? labels : false;
    }, { timeoutMs: 10_000 });
    await screenshot(nia.page, out, "03-three-generals");
  });
});

test("your own messages can be edited and deleted, with the keyboard too", { timeout: 90_000 }, async () => {
  const dora = await signedIn("dora");
  const eli = await signedIn("eli");
  await onFailure([dora, eli], "edit", async () => {
    await openDm(dora, "eli");
    await sidebar(eli).getByRole("button", { name: /Direct message with dora/ }).click();
    const composer = dora.page.getByLabel("Message eli");

    // Shift+Enter is a new line, Enter sends.
    await composer.pressSequentially("line one");
    await composer.press("Shift+Enter");
    await composer.pressSequentially("line two");
    await composer.press("Enter");
    await row(eli, "line one\nline two").waitFor({ timeout: 10_000 });
    assert.equal(await composer.inputValue(), "", "the composer is empty after sending");

    await eli.page.getByLabel("Message dora").fill("hi dora");
    await eli.page.getByLabel("Message dora").press("Enter");
    await row(dora, "hi dora").waitFor({ timeout: 10_000 });
    await row(dora, "hi dora").hover();
    assert.equal(await row(dora, "hi dora").getByRole("button", { name: "Edit message" }).count(), 0, "no Edit on someone else's message");
    assert.equal(await row(dora, "hi dora").getByRole("button", { name: "Delete message" }).count(), 0, "no Delete on someone else's message");

    // Edit with the button.
    await row(dora, "line one\nline two").hover();
    await row(dora, "line one\nline two").getByRole("button", { name: "Edit message" }).click();
    const edit = dora.page.locator("#edit-input");
    await edit.waitFor();
    await screenshot(dora.page, out, "04-editing-a-message");
    await edit.fill("line one, fixed");
    await edit.press("Enter");
    await row(eli, "line one, fixed").locator(".edited").waitFor({ timeout: 10_000 });
    await row(dora, "line one, fixed").locator(".edited").waitFor({ timeout: 10_000 });

    // ArrowUp in the empty composer edits the last message; Escape cancels.
    await composer.fill("second");
    await composer.press("Enter");
    await row(eli, "second").waitFor({ timeout: 10_000 });
    await waitFor("dora's 'second' to be acknowledged", async () => (await dora.page.locator("#message-list li.pending").count()) === 0, { timeoutMs: 10_000 });
    await composer.press("ArrowUp");
    await waitFor("the editor on dora's last message", async () => (await edit.isVisible()) && (await edit.inputValue()) === "second", { timeoutMs: 5_000 });
    assert.ok(await edit.evaluate((el) => el === document.activeElement), "the editor has the focus");
    // While Dora types, Eli answers and the list changes around her: she keeps typing undisturbed.
    await edit.pressSequentially(" and more");
    await eli.page.getByLabel("Message dora").fill("ok");
    await eli.page.getByLabel("Message dora").press("Enter");
    await row(dora, "ok").waitFor({ timeout: 10_000 });
    assert.ok(await edit.evaluate((el) => el === document.activeElement), "the editor keeps the focus while the list changes");
    assert.equal(await edit.inputValue(), "second and more");
    await edit.press("Escape");
    await edit.waitFor({ state: "detached", timeout: 5_000 });
    assert.ok(await composer.evaluate((el) => el === document.activeElement), "the composer has the focus again");
    await composer.press("ArrowUp");
    await edit.fill("second, edited by keyboard");
    await edit.press("Enter");
    await row(eli, "second, edited by keyboard").waitFor({ timeout: 10_000 });

    // Delete: Escape closes the question without deleting; confirming deletes for everyone.
    await row(dora, "second, edited by keyboard").hover();
    await row(dora, "second, edited by keyboard").getByRole("button", { name: "Delete message" }).click();
    await dora.page.getByRole("dialog", { name: "Delete message" }).waitFor();
    await screenshot(dora.page, out, "05-delete-question");
    await dora.page.keyboard.press("Escape");
    await dora.page.locator("dialog").waitFor({ state: "detached", timeout: 5_000 });
    assert.equal(await row(dora, "second, edited by keyboard").count(), 1, "still there after Escape");
    await row(dora, "second, edited by keyboard").hover();
    await row(dora, "second, edited by keyboard").getByRole("button", { name: "Delete message" }).click();
    await dora.page.getByRole("dialog", { name: "Delete message" }).getByRole("button", { name: "Delete" }).click();
    await row(eli, "Message deleted").waitFor({ timeout: 10_000 });
    await row(dora, "Message deleted").waitFor({ timeout: 10_000 });
    assert.equal(await row(eli, "second, edited by keyboard").count(), 0);
    await screenshot(eli.page, out, "06-eli-sees-edit-and-delete");

    // Escape closes the other dialogs too.
    await dora.page.getByRole("button", { name: "New channel" }).click();
    await dora.page.getByRole("dialog").waitFor();
    await dora.page.keyboard.press("Escape");
    await dora.page.locator("dialog").waitFor({ state: "detached", timeout: 5_000 });
  });
});

test("\"Seen by\" is never shown under a person's own message", { timeout: 60_000 }, async () => {
  const rae = await signedIn("rae");
  const sol = await signedIn("sol");
  await onFailure([rae, sol], "seen-by", async () => {
    await openDm(rae, "sol");
    await sidebar(sol).getByRole("button", { name: /Direct message with rae/ }).click();
    await rae.page.getByLabel("Message sol").fill("are you there?");
    await rae.page.getByLabel("Message sol").press("Enter");
    await row(rae, "are you there?").locator(".read-receipt", { hasText: "Seen by sol" }).waitFor({ timeout: 10_000 });

    // Sol answers while looking at the conversation: his read position moves to his own message.
    await sol.page.getByLabel("Message rae").fill("yes, here");
    await sol.page.getByLabel("Message rae").press("Enter");
    const answer = row(rae, "yes, here");
    await answer.waitFor({ timeout: 10_000 });
    // Sol's new read position reaches Rae's page: his receipt leaves her message...
    await row(rae, "are you there?").locator(".read-receipt").waitFor({ state: "detached", timeout: 10_000 });
    assert.equal(await answer.locator(".read-receipt").count(), 0, "...and is not put under Sol's own message");
    assert.equal(await rae.page.locator("#message-list .read-receipt").count(), 0, "nor anywhere else: his answer says he saw it");
    await screenshot(rae.page, out, "07-no-seen-by-under-own-message");
  });
});

test("members are seen, added, removed and their roles changed from the channel header, within each role", { timeout: 90_000 }, async () => {
  const fay = await signedIn("fay");
  await onFailure([fay], "members", async () => {
    await createChannel(fay, "team");
    await fay.page.getByRole("button", { name: "Members (1)" }).click();
    const dialog = fay.page.locator("#members-dialog");
    await dialog.waitFor();
    assert.equal(await dialog.locator("li[data-user-id=fay]").getAttribute("data-role"), "owner");
    // An owner adds a moderator and a member.
    await dialog.getByLabel("User id").fill("gus");
    await dialog.getByLabel("Role", { exact: true }).selectOption("moderator");
    await dialog.getByRole("button", { name: "Add", exact: true }).click();
    await dialog.locator("li[data-user-id=gus][data-role=moderator]").waitFor({ timeout: 10_000 });
    await dialog.getByLabel("User id").fill("hal");
    await dialog.getByLabel("Role", { exact: true }).selectOption("member");
    await dialog.getByRole("button", { name: "Add", exact: true }).click();
    await dialog.locator("li[data-user-id=hal][data-role=member]").waitFor({ timeout: 10_000 });
    // Adding someone again under another role says so instead of pretending.
    await dialog.getByLabel("User id").fill("hal");
    await dialog.getByLabel("Role", { exact: true }).selectOption("moderator");
    await dialog.getByRole("button", { name: "Add", exact: true }).click();
    await dialog.getByRole("alert").filter({ hasText: "hal is already a member" }).waitFor({ timeout: 10_000 });
    await screenshot(fay.page, out, "08-owner-members-dialog");
    await fay.page.keyboard.press("Escape");
    await dialog.waitFor({ state: "detached", timeout: 5_000 });
    await fay.page.getByRole("button", { name: "Members (3)" }).waitFor({ timeout: 5_000 });

    // A member sees everyone but can change nothing.
    const hal = await signedIn("hal");
    await sidebar(hal).getByRole("button", { name: /Channel team/ }).click();
    await hal.page.getByRole("button", { name: "Members (3)" }).click();
    const halDialog = hal.page.locator("#members-dialog");
    await halDialog.locator("li[data-user-id=fay][data-role=owner]").waitFor();
    assert.equal(await halDialog.getByRole("button", { name: /^Remove / }).count(), 0);
    assert.equal(await halDialog.locator("select.role-select").count(), 0, "a member changes no role");
    assert.ok(await halDialog.locator("form.members-add").isHidden(), "no add form for a member");
    await screenshot(hal.page, out, "09-member-members-dialog");

    // The owner changes roles from the list; the member's open dialog follows live.
    await fay.page.getByRole("button", { name: "Members (3)" }).click();
    await dialog.waitFor();
    assert.deepEqual(await dialog.getByLabel("Role of hal").locator("option").allTextContents(), ["member", "moderator", "owner"]);
    await dialog.getByLabel("Role of hal").selectOption("moderator");
    await dialog.locator("li[data-user-id=hal][data-role=moderator]").waitFor({ timeout: 10_000 });
    await halDialog.locator("li[data-user-id=hal][data-role=moderator]").waitFor({ timeout: 10_000 });
    await halDialog.locator("form.members-add").waitFor({ timeout: 10_000 }); // now a moderator: hal adds members
    await screenshot(hal.page, out, "09b-member-promoted-live");
    // The only owner cannot step down: the server refuses and the list keeps her an owner.
    await dialog.getByLabel("Role of fay").selectOption("member");
    await dialog.getByRole("alert").filter({ hasText: "only owner" }).waitFor({ timeout: 10_000 });
    assert.equal(await dialog.locator("li[data-user-id=fay]").getAttribute("data-role"), "owner");
    assert.equal(await dialog.getByLabel("Role of fay").inputValue(), "owner");
    await screenshot(fay.page, out, "09c-owner-changes-roles");
    await dialog.getByLabel("Role of hal").selectOption("member");
    await halDialog.locator("li[data-user-id=hal][data-role=member]").waitFor({ timeout: 10_000 });
    assert.ok(await halDialog.locator("form.members-add").isHidden(), "a member again: no add form");
    await fay.page.keyboard.press("Escape");
    await dialog.waitFor({ state: "detached", timeout: 5_000 });

    // A moderator removes members, not owners, and adds members only.
    const gus = await signedIn("gus");
    await sidebar(gus).getByRole("button", { name: /Channel team/ }).click();
    await gus.page.getByRole("button", { name: "Members (3)" }).click();
    const gusDialog = gus.page.locator("#members-dialog");
    await gusDialog.getByRole("button", { name: "Remove hal" }).waitFor();
    assert.equal(await gusDialog.getByRole("button", { name: "Remove fay" }).count(), 0, "a moderator cannot remove the owner");
    assert.deepEqual(await gusDialog.getByLabel("Role", { exact: true }).locator("option").allTextContents(), ["member"]);
    // A moderator changes no one else's role, and may only step down themselves.
    assert.equal(await gusDialog.locator("select.role-select").count(), 1);
    assert.deepEqual(await gusDialog.getByLabel("Role of gus").locator("option").allTextContents(), ["member", "moderator"]);
    await screenshot(gus.page, out, "10-moderator-members-dialog");
    await gusDialog.getByRole("button", { name: "Remove hal" }).click();
    await gusDialog.locator("li[data-user-id=hal]").waitFor({ state: "detached", timeout: 10_000 });
    // Hal's page loses the channel; Fay's header counts one less.
    await sidebar(hal).getByRole("button", { name: /Channel team/ }).waitFor({ state: "detached", timeout: 10_000 });
    await fay.page.getByRole("button", { name: "Members (2)" }).waitFor({ timeout: 10_000 });
    // Leaving.
    await gusDialog.getByRole("button", { name: "Leave channel" }).click();
    await sidebar(gus).getByRole("button", { name: /Channel team/ }).waitFor({ state: "detached", timeout: 10_000 });
    await fay.page.getByRole("button", { name: "Members (1)" }).waitFor({ timeout: 10_000 });
  });
});

test("on a phone-sized screen the conversation comes first and the list is behind a button", { timeout: 60_000 }, async () => {
  const jan = await signedIn("jan", { width: 390, height: 844 });
  await onFailure([jan], "narrow", async () => {
    const list = jan.page.locator("#sidebar");
    const toggle = jan.page.getByRole("button", { name: "Conversations", exact: true });
    // Nothing open yet: the list is what there is to see.
    assert.ok(await list.isVisible(), "the list shows while no conversation is open");
    await screenshot(jan.page, out, "11-narrow-nothing-open");
    await createChannel(jan, "notes", ["kai"]);
    await jan.page.getByRole("heading", { name: "# notes" }).waitFor();
    assert.ok(await list.isHidden(), "an open conversation takes the screen");
    assert.ok(await jan.page.getByLabel("Message #notes").isVisible());
    await jan.page.getByLabel("Message #notes").fill("from my phone");
    await jan.page.getByLabel("Message #notes").press("Enter");
    await row(jan, "from my phone").waitFor({ timeout: 10_000 });
    const overflow = await jan.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `nothing wider than the screen (${overflow}px too wide)`);
    await screenshot(jan.page, out, "12-narrow-conversation");
    await toggle.click();
    assert.equal(await toggle.getAttribute("aria-expanded"), "true");
    await list.waitFor({ state: "visible" });
    await screenshot(jan.page, out, "13-narrow-list-open");
    await jan.page.keyboard.press("Escape");
    await list.waitFor({ state: "hidden", timeout: 5_000 });
    await toggle.click();
    await sidebar(jan).getByRole("button", { name: /Channel notes/ }).click();
    await list.waitFor({ state: "hidden", timeout: 5_000 });
    assert.equal(await toggle.getAttribute("aria-expanded"), "false");
    await jan.page.getByRole("button", { name: "Members (2)" }).click();
    await jan.page.locator("#members-dialog").waitFor();
    await screenshot(jan.page, out, "14-narrow-members-dialog");
  });
});

test("a call rings, is answered, announces joins and leaves, and ends as a missed call when nobody answers", { timeout: 150_000 }, async () => {
  const kim = await signedIn("kim");
  const lea = await signedIn("lea");
  await onFailure([kim, lea], "calls", async () => {
    await openDm(kim, "lea");
    await sidebar(lea).getByRole("button", { name: /Direct message with kim/ }).waitFor({ timeout: 10_000 });
    await waitFor("Kim to see Lea online", async () => (await kim.page.locator("#dm-list .presence[data-user-id=lea]").getAttribute("data-status")) === "online", { timeoutMs: 10_000 });

    // Kim calls; Lea's page rings (with sound: the tests allow autoplay).
    await kim.page.getByRole("button", { name: "Start call" }).click();
    await kim.page.locator("#call-waiting", { hasText: "Calling lea…" }).waitFor({ timeout: 15_000 });
    const ringing = lea.page.getByRole("dialog", { name: "Incoming call" });
    await ringing.waitFor({ timeout: 10_000 });
    assert.equal(await lea.page.locator("#incoming-call-text").textContent(), "kim is calling you.");
    await waitFor("the ring tone to play", async () => (await lea.page.locator("#incoming-call").getAttribute("data-sound")) === "playing", { timeoutMs: 5_000 });
    await screenshot(lea.page, out, "15-lea-is-rung");
    await screenshot(kim.page, out, "16-kim-is-calling");

    // Lea answers: both are in the call, Kim is told.
    await ringing.getByRole("button", { name: "Accept" }).click();
    await ringing.waitFor({ state: "detached", timeout: 5_000 });
    await lea.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 15_000 });
    await kim.page.locator("#call-notices li", { hasText: "lea joined the call" }).waitFor({ timeout: 15_000 });
    assert.ok(await kim.page.locator("#call-waiting").isHidden(), "no more \"Calling…\" once Lea is there");
    await screenshot(kim.page, out, "17-kim-told-lea-joined");

    // Lea leaves: Kim is told; Kim leaves, the call ends, both see it in the conversation.
    await lea.page.getByRole("button", { name: "Leave" }).click();
    await kim.page.locator("#call-notices li", { hasText: "lea left the call" }).waitFor({ timeout: 15_000 });
    await screenshot(kim.page, out, "18-kim-told-lea-left");
    await kim.page.getByRole("button", { name: "Leave" }).click();
    await kim.page.locator(".call-notice[data-kind=ended]", { hasText: "Call with you and lea" }).waitFor({ timeout: 15_000 });
    await lea.page.locator(".call-notice[data-kind=ended]", { hasText: "Call with kim and you" }).waitFor({ timeout: 15_000 });

    // Kim calls again; Lea declines (Escape; chat-and-call clicks Decline); after the ring time
    // Kim gives up, and both see a missed call.
    await kim.page.getByRole("button", { name: "Start call" }).click();
    await ringing.waitFor({ timeout: 10_000 });
    await lea.page.keyboard.press("Escape");
    await ringing.waitFor({ state: "detached", timeout: 5_000 });
    await kim.page.locator("#call-status", { hasText: "No answer from lea." }).waitFor({ timeout: RING_MS + 10_000 });
    await kim.page.locator(".call-notice[data-kind=missed]", { hasText: "lea did not answer your call" }).waitFor({ timeout: 10_000 });
    await lea.page.locator(".call-notice[data-kind=missed]", { hasText: "Missed call from kim" }).waitFor({ timeout: 10_000 });
    await screenshot(kim.page, out, "19-kim-no-answer");
    await screenshot(lea.page, out, "20-lea-missed-call");

    // Someone offline: Kim is told at once, and the call ends unanswered.
    await kim.page.getByRole("button", { name: "Close" }).click();
    await openDm(kim, "mo");
    await kim.page.getByRole("button", { name: "Start call" }).click();
    await kim.page.locator("#call-waiting", { hasText: "mo is offline. They will see a missed call." }).waitFor({ timeout: 15_000 });
    await screenshot(kim.page, out, "21-kim-calls-someone-offline");
    await kim.page.locator("#call-status", { hasText: "No answer from mo." }).waitFor({ timeout: RING_MS + 10_000 });
    await kim.page.locator(".call-notice[data-kind=missed]", { hasText: "mo did not answer your call" }).waitFor({ timeout: 10_000 });
  });
});

test("a call in a channel invites the members quietly, without taking over their page", { timeout: 120_000 }, async () => {
  const uma = await signedIn("uma");
  const vic = await signedIn("vic");
  await onFailure([uma, vic], "channel-call", async () => {
    await createChannel(uma, "standup", ["vic"]);
    await sidebar(vic).getByRole("button", { name: /Channel standup/ }).click();
    await vic.page.getByRole("heading", { name: "# standup" }).waitFor();

    await uma.page.getByRole("button", { name: "Start call" }).click();
    await uma.page.locator("#call-waiting", { hasText: "Waiting for others to join…" }).waitFor({ timeout: 15_000 });
    const invite = vic.page.getByRole("dialog", { name: "Call started" });
    await invite.waitFor({ timeout: 10_000 });
    assert.equal(await vic.page.locator("#incoming-call-text").textContent(), "uma started a call in # standup.");
    assert.equal(await vic.page.locator("#incoming-call").getAttribute("data-sound"), null, "no ring tone for a channel call");
    // The page stays usable: Vic writes while the notice is up.
    await vic.page.getByLabel("Message #standup").fill("joining in a second");
    await vic.page.getByLabel("Message #standup").press("Enter");
    await row(uma, "joining in a second").waitFor({ timeout: 10_000 });
    await screenshot(vic.page, out, "22-vic-invited-to-a-channel-call");
    await invite.getByRole("button", { name: "Join" }).click();
    await invite.waitFor({ state: "detached", timeout: 5_000 });
    await vic.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 15_000 });
    await uma.page.locator("#call-notices li", { hasText: "vic joined the call" }).waitFor({ timeout: 15_000 });
    await vic.page.getByRole("button", { name: "Leave" }).click();
    await uma.page.locator("#call-notices li", { hasText: "vic left the call" }).waitFor({ timeout: 15_000 });
    await uma.page.locator("#call-waiting", { hasText: "You are the only one in the call." }).waitFor({ timeout: 5_000 });
    await uma.page.getByRole("button", { name: "Leave" }).click();
    await vic.page.locator(".call-notice[data-kind=ended]", { hasText: "Call with uma and you" }).waitFor({ timeout: 15_000 });

    // Dismissed, and nobody joins: a channel call waits (no "No answer"); its starter ends it.
    await uma.page.getByRole("button", { name: "Start call" }).click();
    await invite.waitFor({ timeout: 10_000 });
    await vic.page.keyboard.press("Escape");
    await invite.waitFor({ state: "detached", timeout: 5_000 });
    await uma.page.getByRole("button", { name: "Leave" }).click();
    await vic.page.locator(".call-notice[data-kind=missed]", { hasText: "uma started a call no one joined" }).waitFor({ timeout: 15_000 });
    await uma.page.locator(".call-notice[data-kind=missed]", { hasText: "No one joined your call" }).waitFor({ timeout: 15_000 });
    await screenshot(vic.page, out, "23-vic-sees-the-unjoined-call");
  });
});

test("an unread count computed before your read does not bring the badge back", { timeout: 60_000 }, async () => {
  // Wes's WebSocket goes through the test, which can hand his page a frame as the server would.
  const context = await newContext(browser, server.origin);
  contexts.push(context);
  const page = await context.newPage();
  logPageErrors(page, "wes", log);
  const sockets: Array<import("playwright-core").WebSocketRoute> = [];
  await page.routeWebSocket(/\/v1\/ws$/, (ws) => {
    sockets.push(ws);
    ws.connectToServer();
  });
  await page.goto(server.origin);
  await page.getByLabel("User id").fill("wes");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  const wes: Person = { name: "wes", page };
  const xan = await signedIn("xan");
  await onFailure([wes, xan], "stale-unread", async () => {
    await openDm(xan, "wes");
    await xan.page.getByLabel("Message wes").fill("one");
    await xan.page.getByLabel("Message wes").press("Enter");
    const dm = sidebar(wes).getByRole("button", { name: /Direct message with xan/ });
    await waitFor("Wes to see 1 unread", async () => (await dm.getAttribute("aria-label"))?.includes("1 unread"), { timeoutMs: 10_000 });
    await dm.click();
    await row(wes, "one").waitFor({ timeout: 10_000 });
    await waitFor("the DM to be read on Wes's side", async () => !(await dm.getAttribute("aria-label"))?.includes("unread"), { timeoutMs: 10_000 });
    const seq = Number(await row(wes, "one").getAttribute("data-seq"));
    const channelId = await dm.getAttribute("data-channel-id");

    // The count looked up when "one" arrived, before Wes read it, comes after his read.
    const socket = sockets[sockets.length - 1]!;
    socket.send(JSON.stringify({ type: "unread.updated", channel_id: channelId, unread_count: 1, last_read_seq: seq - 1 }));
    await page.evaluate(() => new Promise((r) => setTimeout(r, 300)));
    assert.ok(!(await dm.getAttribute("aria-label"))?.includes("unread"), "a stale count does not mark the read DM unread again");
    await screenshot(page, out, "24-stale-unread-ignored");

    // A real change still shows: Wes looks elsewhere, Xan writes again.
    await page.getByRole("button", { name: "New channel" }).click();
    await page.getByRole("dialog").getByLabel("Channel name").fill("elsewhere");
    await page.getByRole("dialog").getByRole("button", { name: "Create channel" }).click();
    await page.getByRole("heading", { name: "# elsewhere" }).waitFor();
    await xan.page.getByLabel("Message wes").fill("two");
    await xan.page.getByLabel("Message wes").press("Enter");
    await waitFor("Wes to see 1 unread again", async () => (await dm.getAttribute("aria-label"))?.includes("1 unread"), { timeoutMs: 10_000 });
  });
});
