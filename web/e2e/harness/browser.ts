/**
 * Launches Debian's Chromium (/usr/bin/chromium, or $PARLEY_CHROMIUM) headless through
 * playwright-core, with fake camera and microphone and WebRTC allowed on loopback.
 */
import { existsSync } from "node:fs";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";

export const chromiumPath = process.env.PARLEY_CHROMIUM ?? "/usr/bin/chromium";

export async function launchChromium(): Promise<Browser> {
  if (!existsSync(chromiumPath)) {
    throw new Error(`Chromium not found at ${chromiumPath}: install it with \`apt-get install -y chromium\` (web/scripts/test.sh does)`);
  }
  const args = [
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
    // `localhost` pages and sockets go to 127.0.0.1 only (servers listen there, not on ::1).
    "--host-resolver-rules=MAP localhost 127.0.0.1",
    // Two browser contexts share two cores with a server and other work: keep Chromium small.
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
    "--mute-audio",
    // An incoming call may ring without an earlier click on the page (the tone is still muted).
    "--autoplay-policy=no-user-gesture-required",
  ];
  // Chromium's sandbox refuses to start as root (CI runs as root).
  if (process.getuid?.() === 0) args.push("--no-sandbox");
  return chromium.launch({ executablePath: chromiumPath, headless: true, args, timeout: 30_000 });
}

/** A fresh context (its own storage, like a second person) with camera and microphone allowed. */
export async function newContext(browser: Browser, origin: string): Promise<BrowserContext> {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  await context.grantPermissions(["camera", "microphone"], { origin });
  context.setDefaultTimeout(15_000);
  return context;
}

/** Forwards the page's console errors and page errors to the test's output, prefixed by `who`. */
export function logPageErrors(page: Page, who: string, sink: (line: string) => void): void {
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") sink(`[${who} console.${msg.type()}] ${msg.text()}`);
  });
  page.on("pageerror", (err) => sink(`[${who} pageerror] ${err.message}`));
}
