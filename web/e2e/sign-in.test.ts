/**
 * Signing in: a development server hands out tokens (the sign-in survives a reload, sign-out
 * returns to the form); a server with configured JWT keys has no development tokens, and the
 * form says so instead of failing silently.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Browser } from "playwright-core";
import { artifactsDir, screenshot, webDir } from "./harness/artifacts.js";
import { launchChromium, logPageErrors, newContext } from "./harness/browser.js";
import { startServer, type ParleyServer } from "./harness/server.js";

const out = artifactsDir("sign-in");
const log = (line: string) => console.log(`# ${line}`);

let browser: Browser;
const servers: ParleyServer[] = [];

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close().catch(() => {});
  for (const s of servers) await s.stop();
});

test("a development user signs in, stays signed in across a reload, and signs out", { timeout: 60_000 }, async () => {
  const server = await startServer({ webDir: join(webDir, "dist"), logDir: out });
  servers.push(server);
  const context = await newContext(browser, server.origin);
  const page = await context.newPage();
  logPageErrors(page, "carol", log);
  await page.goto(server.origin);

  await page.getByLabel("User id").fill("not a user id!");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "Enter a user id" }).waitFor({ timeout: 5_000 });

  await page.getByLabel("User id").fill("carol");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  assert.equal(await page.locator("#signed-in-as strong").textContent(), "carol");
  await screenshot(page, out, "01-signed-in-empty");

  await page.reload();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  assert.equal(await page.locator("#signed-in-as strong").textContent(), "carol", "still signed in after a reload");

  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByRole("button", { name: "Sign in" }).waitFor({ timeout: 5_000 });
  await context.close();
});

test("without a development key, the sign-in form says development tokens are not available", { timeout: 60_000 }, async () => {
  const server = await startServer({
    webDir: join(webDir, "dist"),
    logDir: out,
    args: ["--jwt-hs256-secret", "a-configured-secret-of-at-least-32-characters"],
  });
  servers.push(server);
  const context = await newContext(browser, server.origin);
  const page = await context.newPage();
  await page.goto(server.origin);
  await page.getByLabel("User id").fill("dave");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "does not hand out development tokens" }).waitFor({ timeout: 10_000 });
  await screenshot(page, out, "02-no-development-tokens");
  await context.close();
});
