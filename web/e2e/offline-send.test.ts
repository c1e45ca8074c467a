/**
 * A message written while the server cannot be reached waits in the SDK's outbox, which the app
 * keeps in sessionStorage: after a reload of the tab it is sent, once.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Browser, WebSocketRoute } from "playwright-core";
import { artifactsDir, screenshot, webDir } from "./harness/artifacts.js";
import { launchChromium, logPageErrors, newContext } from "./harness/browser.js";
import { startServer, type ParleyServer } from "./harness/server.js";
import { waitFor } from "./harness/wait.js";

const out = artifactsDir("offline-send");
const log = (line: string) => console.log(`# ${line}`);

let browser: Browser;
let server: ParleyServer;

before(async () => {
  server = await startServer({ webDir: join(webDir, "dist"), logDir: out });
  browser = await launchChromium();
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

test("a message sent while the server is unreachable is delivered after a reload", { timeout: 90_000 }, async () => {
  const context = await newContext(browser, server.origin);
  const page = await context.newPage();
  logPageErrors(page, "erin", log);

  // Every WebSocket of the page goes through here: passed on to the server, or, while `cut`,
  // answered by nobody (the client waits for a welcome that never comes).
  let cut = false;
  const sockets: WebSocketRoute[] = [];
  await page.routeWebSocket(/\/v1\/ws$/, (ws) => {
    sockets.push(ws);
    if (!cut) ws.connectToServer();
  });

  await page.goto(server.origin);
  await page.getByLabel("User id").fill("erin");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  await page.getByRole("button", { name: "New channel" }).click();
  await page.getByRole("dialog").getByLabel("Channel name").fill("notes");
  await page.getByRole("dialog").getByRole("button", { name: "Create channel" }).click();
  await page.getByRole("heading", { name: "# notes" }).waitFor({ timeout: 10_000 });

  cut = true;
  for (const ws of sockets) await ws.close();
  await page.locator("#connection-status[data-state=reconnecting]").waitFor({ timeout: 10_000 });
  await page.getByLabel("Message #notes").fill("written offline");
  await page.getByLabel("Message #notes").press("Enter");
  await page.locator("#message-list li.pending", { hasText: "written offline" }).waitFor({ timeout: 5_000 });
  await screenshot(page, out, "01-pending-while-offline");

  cut = false;
  await page.reload();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  await page.locator("#message-list li:not(.pending)", { hasText: "written offline" }).waitFor({ timeout: 15_000 });
  await screenshot(page, out, "02-sent-after-reload");

  const token = await server.devToken("erin");
  const channels = (await (await fetch(`http://127.0.0.1:${server.port}/v1/channels`, { headers: { authorization: `Bearer ${token}` } })).json()) as {
    channels: Array<{ id: string; name?: string | null }>;
  };
  const notes = channels.channels.find((c) => c.name === "notes");
  assert.ok(notes, "the channel exists");
  await waitFor("the message in the channel's history, once", async () => {
    const res = await fetch(`http://127.0.0.1:${server.port}/v1/channels/${notes.id}/messages`, { headers: { authorization: `Bearer ${token}` } });
    const page = (await res.json()) as { messages: Array<{ text: string }> };
    const copies = page.messages.filter((m) => m.text === "written offline").length;
    if (copies > 1) throw new Error(`stored ${copies} times`);
    return copies === 1;
  }, { timeoutMs: 10_000 });
  await context.close();
});
