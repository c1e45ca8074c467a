/**
 * CORS from a real browser: a page served from one origin calls a Parley server on another
 * origin with the SDK. `PUT /v1/channels/{id}/read` (a preflighted request: PUT, a bearer token,
 * a JSON body) succeeds from an origin on `--allowed-origin`, and fails from one that is not.
 */
import { readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import { chromium, type Browser } from "playwright-core";
import { afterAll, beforeAll, expect, it } from "vitest";
import { RestClient } from "../../src/index.js";
import { startServer, type TestServer } from "../helpers/server.js";

const CHROMIUM = process.env.PARLEY_CHROMIUM ?? "/usr/bin/chromium";
const files: Record<string, { type: string; path: string }> = {
  "/sdk.js": { type: "text/javascript", path: fileURLToPath(new URL("../../dist/index.js", import.meta.url)) },
  "/cors-page.js": { type: "text/javascript", path: fileURLToPath(new URL("./browser/cors-page.js", import.meta.url)) },
};

let pages: Server;
let pagePort: number;
let api: TestServer;
let browser: Browser;
let token: string;
let channelId: string;
let rest: RestClient;

beforeAll(async () => {
  // The application's pages: their own little server on 127.0.0.1, reachable as two origins
  // (http://127.0.0.1:P and http://localhost:P), of which only the first is allowed.
  pages = createServer((req, res) => {
    const file = files[req.url ?? ""];
    if (file) {
      res.writeHead(200, { "content-type": file.type });
      res.end(readFileSync(file.path));
    } else {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(`<!doctype html><meta charset="utf-8"><title>loading</title><script type="module" src="/cors-page.js"></script>`);
    }
  });
  await new Promise<void>((resolve) => pages.listen(0, "127.0.0.1", resolve));
  pagePort = (pages.address() as AddressInfo).port;
  api = await startServer(["--allowed-origin", `http://127.0.0.1:${pagePort}`]);
  token = await api.token("alice");
  rest = new RestClient({ baseUrl: api.url, token });
  channelId = (await rest.createChannel({ kind: "channel", name: "cors" })).id;
  const args = ["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"];
  if (process.getuid?.() === 0) args.push("--no-sandbox"); // Chromium's sandbox refuses root
  browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args, timeout: 30_000 }).catch((e: unknown) => {
    throw new Error(`cannot launch Chromium at ${CHROMIUM} (apt-get install chromium, or set PARLEY_CHROMIUM): ${String(e)}`);
  });
}, 60_000);

afterAll(async () => {
  await browser?.close().catch(() => {});
  await api?.stop();
  await new Promise((resolve) => pages?.close(resolve));
});

/** Marks the channel read up to `seq` from a page of `origin`; the page's result. */
async function markReadFrom(origin: string, seq: number): Promise<{ ok?: { last_read_seq: number }; error?: string }> {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    page.setDefaultTimeout(15_000);
    await page.goto(origin);
    await page.waitForFunction(() => document.title === "ready");
    return await page.evaluate(
      (arg) => (window as unknown as { harness: { markRead(a: unknown): Promise<{ ok?: { last_read_seq: number }; error?: string }> } }).harness.markRead(arg),
      { baseUrl: api.url, token, channelId, seq },
    );
  } finally {
    await context.close();
  }
}

async function sendOne(text: string): Promise<number> {
  const bob = new RestClient({ baseUrl: api.url, token: await api.token("bob") });
  await rest.addMember(channelId, { user_id: "bob" });
  return (await bob.sendMessage(channelId, { client_msg_id: text, text })).message.seq;
}

it("a PUT from an allowed origin succeeds", async () => {
  const seq = await sendOne("first");
  const result = await markReadFrom(`http://127.0.0.1:${pagePort}`, seq);
  expect(result, JSON.stringify(result)).toEqual({ ok: expect.objectContaining({ last_read_seq: seq }) });
  expect((await rest.readState(channelId)).last_read_seq).toBe(seq);
});

it("a PUT from an origin that is not allowed fails, and changes nothing", async () => {
  const before = (await rest.readState(channelId)).last_read_seq;
  const seq = await sendOne("second");
  const result = await markReadFrom(`http://localhost:${pagePort}`, seq);
  expect(result, "the browser refuses the answer").toEqual({ error: "network" });
  expect((await rest.readState(channelId)).last_read_seq, "the preflight stopped the PUT").toBe(before);
});
