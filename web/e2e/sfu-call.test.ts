/**
 * Four people (four browser contexts, fake camera and microphone) join one channel call in the
 * web client, served by a real `parley serve` with its in-process SFU. The fourth join crosses
 * the escalation threshold (4, the default): the call moves to the SFU without ending, every
 * page decodes the three others' video through its one connection to the SFU (`framesDecoded`
 * rising per tile), the grid marks the active speaker, and after one person leaves the other
 * three keep decoding each other. A tile scrolled out of view gets no video until it is back.
 * Screenshots of each stage go to the artefact folder.
 */
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { artifactsDir, screenshot, webDir } from "./harness/artifacts.js";
import { launchChromium, logPageErrors, newContext } from "./harness/browser.js";
import { startServer, type ParleyServer } from "./harness/server.js";
import { watchSignals, type SignalLog } from "./harness/signals.js";
import { waitFor } from "./harness/wait.js";
import { installLoopbackWebRTC } from "./harness/webrtc.js";

const out = artifactsDir("sfu-call");
const log = (line: string) => console.log(`# ${line}`);

let server: ParleyServer;
let browser: Browser;

before(async () => {
  server = await startServer({
    webDir: join(webDir, "dist"),
    logDir: out,
    // The in-process SFU on loopback only; escalation at the default threshold of 4.
    args: ["--sfu-listen", "127.0.0.1:0"],
  });
  browser = await launchChromium();
});

after(async () => {
  await browser?.close().catch(() => {});
  await server?.stop();
});

interface Person {
  name: string;
  context: BrowserContext;
  page: Page;
  signals: SignalLog;
}

/**
 * Makes the page's microphone a steady 440 Hz tone (Chromium's fake microphone beeps 20 ms every
 * half second, too quiet on average to count as speech): that person is the one speaking.
 * Serialized into the page.
 */
function speakWithTone(): void {
  const devices = navigator.mediaDevices;
  const original = devices.getUserMedia.bind(devices);
  devices.getUserMedia = async (constraints?: MediaStreamConstraints) => {
    const stream = await original(constraints);
    if (!constraints?.audio) return stream;
    const audio = new AudioContext();
    const oscillator = audio.createOscillator();
    const gain = audio.createGain();
    gain.gain.value = 0.5;
    const destination = audio.createMediaStreamDestination();
    oscillator.connect(gain).connect(destination);
    oscillator.start();
    await audio.resume();
    for (const t of stream.getAudioTracks()) t.stop();
    return new MediaStream([...stream.getVideoTracks(), ...destination.stream.getAudioTracks()]);
  };
}

async function open(name: string, speaking = false): Promise<Person> {
  const context = await newContext(browser, server.origin);
  await context.addInitScript(installLoopbackWebRTC);
  if (speaking) await context.addInitScript(speakWithTone);
  const page = await context.newPage();
  logPageErrors(page, name, log);
  const signals = watchSignals(page);
  await page.goto(server.origin);
  await page.getByLabel("User id").fill(name);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection-status[data-state=connected]").waitFor({ timeout: 15_000 });
  return { name, context, page, signals };
}

/**
 * Video frames decoded per remote tile of the call grid (by the tile's participant caption),
 * read from `getStats()` of the page's open peer connections: an `inbound-rtp` video stream
 * counts for the tile whose `<video>` plays its track.
 */
async function framesPerTile(page: Page): Promise<Record<string, number>> {
  return page.evaluate(async () => {
    const pcs = (window as unknown as { __parleyTest?: { pcs: RTCPeerConnection[] } }).__parleyTest?.pcs ?? [];
    const byTrack = new Map<string, number>();
    for (const pc of pcs) {
      if (pc.connectionState === "closed") continue;
      (await pc.getStats()).forEach((s: { type: string; kind?: string; framesDecoded?: number; trackIdentifier?: string }) => {
        if (s.type === "inbound-rtp" && s.kind === "video" && s.trackIdentifier) {
          byTrack.set(s.trackIdentifier, (byTrack.get(s.trackIdentifier) ?? 0) + (s.framesDecoded ?? 0));
        }
      });
    }
    const out: Record<string, number> = {};
    for (const figure of document.querySelectorAll<HTMLElement>("#call-tiles figure:not([data-local])")) {
      const who = figure.querySelector("figcaption")?.textContent ?? "?";
      const stream = figure.querySelector("video")?.srcObject as MediaStream | null;
      out[who] = (stream?.getVideoTracks() ?? []).reduce((n, t) => n + (byTrack.get(t.id) ?? 0), 0);
    }
    return out;
  });
}

/** Peer connections of the page that are not closed (one, to the SFU, once escalated). */
async function openPeerConnections(page: Page): Promise<number> {
  return page.evaluate(() => ((window as unknown as { __parleyTest?: { pcs: RTCPeerConnection[] } }).__parleyTest?.pcs ?? []).filter((pc) => pc.connectionState !== "closed").length);
}

/** Waits until `p` decodes more than `by` further frames from each of `others`' tiles. */
async function decodesEach(p: Person, others: string[], by: number, timeoutMs = 60_000): Promise<Record<string, number>> {
  const start = await framesPerTile(p.page);
  return waitFor(
    `${p.name} to decode ${by} more frames of ${others.join(", ")}`,
    async () => {
      const now = await framesPerTile(p.page);
      return others.every((o) => (now[o] ?? 0) > (start[o] ?? 0) + by) ? now : false;
    },
    { timeoutMs, intervalMs: 500 },
  );
}

test("four people in one call: it escalates to the SFU, each decodes the three others, one leaves, the grid marks the active speaker", { timeout: 300_000 }, async () => {
  const names = ["alice", "bob", "carol", "dave"];
  const token = await server.devToken("alice");
  const created = await fetch(`http://127.0.0.1:${server.port}/v1/channels`, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify({ kind: "channel", name: "standup", members: names.slice(1) }),
  });
  assert.equal(created.status, 201, `creating the channel: ${await created.text()}`);

  const people: Person[] = [];
  try {
    // Bob speaks (a steady tone); the others' fake microphones are nearly silent.
    for (const name of names) people.push(await open(name, name === "bob"));
    const [alice, bob, carol, dave] = people as [Person, Person, Person, Person];
    for (const p of people) {
      await p.page.getByRole("navigation", { name: "Conversations" }).getByRole("button", { name: /Channel standup/ }).click();
    }

    // ---- three join peer to peer, the fourth crosses the threshold ----
    await alice.page.getByRole("button", { name: "Start call" }).click();
    await alice.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 15_000 });
    for (const p of [bob, carol]) {
      await p.page.getByRole("button", { name: /Join call/ }).click();
      await p.page.locator("#call-status", { hasText: "In call" }).waitFor({ timeout: 15_000 });
    }
    await decodesEach(alice, ["bob", "carol"], 10);
    assert.equal(await alice.page.locator("#call-panel").getAttribute("data-mode"), "p2p", "three people talk peer to peer");
    await screenshot(alice.page, out, "01-alice-p2p-with-three");

    await dave.page.getByRole("button", { name: /Join call/ }).click();
    for (const p of people) {
      await p.page.locator("#call-panel[data-mode=sfu]").waitFor({ timeout: 20_000 });
      await p.page.locator("#call-status", { hasText: "through the server (SFU)" }).waitFor({ timeout: 20_000 });
    }

    // ---- everyone decodes the three others through the SFU; the mesh is gone ----
    for (const p of people) {
      const others = names.filter((n) => n !== p.name);
      const frames = await decodesEach(p, others, 20, 90_000);
      log(`${p.name} decodes through the SFU: ${JSON.stringify(frames)}`);
      await waitFor(`${p.name} to keep one peer connection (the SFU)`, async () => (await openPeerConnections(p.page)) === 1, { timeoutMs: 30_000 });
    }
    for (const p of people) await screenshot(p.page, out, `02-${p.name}-sfu-grid`);
    // Each grid asked the SFU for the others' video at its tile size (call.sfu op "video").
    for (const p of people) assert.ok((p.signals.sentTypes.get("call.sfu") ?? 0) >= 3, `${p.name} asked for tile sizes (call.sfu frames: ${p.signals.sentTypes.get("call.sfu") ?? 0})`);

    // ---- the active speaker (bob) is marked in every grid: his tile, or bob's own ----
    for (const p of people) {
      const speaking = p.page.locator("#call-tiles figure[data-speaking=true]");
      const tile = p.name === "bob" ? speaking.and(p.page.locator("figure[data-local]")) : speaking.filter({ has: p.page.locator("figcaption", { hasText: /^bob$/ }) });
      await tile.waitFor({ timeout: 30_000 });
      assert.equal(await p.page.locator("#call-tiles figure[data-speaking=true]").count(), 1, `${p.name}'s grid marks one speaker`);
    }
    await screenshot(alice.page, out, "03-alice-active-speaker");

    // ---- tiles out of view get no video: alice's window shrinks, then grows again ----
    await alice.page.setViewportSize({ width: 1100, height: 360 });
    const outOfView = await waitFor("some of alice's remote tiles to be out of view", () =>
      alice.page.evaluate(() => {
        const box = document.querySelector("#call-tiles")!.getBoundingClientRect();
        const bottom = Math.min(box.bottom, window.innerHeight);
        const hidden = [...document.querySelectorAll<HTMLElement>("#call-tiles figure:not([data-local])")]
          .filter((f) => f.getBoundingClientRect().top >= bottom)
          .map((f) => f.querySelector("figcaption")?.textContent ?? "?");
        return hidden.length > 0 ? hidden : false;
      }), { timeoutMs: 10_000 });
    const inView = ["bob", "carol", "dave"].filter((n) => !outOfView.includes(n));
    log(`alice's tiles out of view: ${outOfView.join(", ")}; in view: ${inView.join(", ")}`);
    await new Promise((r) => setTimeout(r, 2_000)); // the pause reaches the SFU; frames in flight drain
    const hiddenBefore = await framesPerTile(alice.page);
    await new Promise((r) => setTimeout(r, 2_000));
    const hiddenAfter = await framesPerTile(alice.page);
    for (const n of outOfView) assert.ok((hiddenAfter[n] ?? 0) - (hiddenBefore[n] ?? 0) <= 2, `no video of ${n} while the tile is out of view (${hiddenBefore[n]} → ${hiddenAfter[n]})`);
    if (inView.length > 0) await decodesEach(alice, inView, 10, 30_000);
    await screenshot(alice.page, out, "04-alice-small-window");
    await alice.page.setViewportSize({ width: 1100, height: 720 });
    await decodesEach(alice, outOfView, 10, 30_000);

    // ---- dave leaves; the three others keep decoding each other ----
    await dave.page.locator("#leave-call").click();
    for (const p of [alice, bob, carol]) {
      await waitFor(`${p.name}'s grid to drop dave's tile`, async () => (await p.page.locator("#call-tiles figure:not([data-local])").count()) === 2, { timeoutMs: 20_000 });
      const others = ["alice", "bob", "carol"].filter((n) => n !== p.name);
      const frames = await decodesEach(p, others, 20, 60_000);
      log(`${p.name} after dave left: ${JSON.stringify(frames)}`);
    }
    await screenshot(alice.page, out, "05-alice-after-dave-left");

    for (const p of people) assert.deepEqual(p.signals.nonLoopback, [], `${p.name} signalled only 127.0.0.1 candidates`);
  } catch (e) {
    for (const p of people) if (!p.page.isClosed()) await screenshot(p.page, out, `failure-${p.name}`).catch(() => {});
    throw e;
  } finally {
    for (const p of people) await p.context.close().catch(() => {});
  }
});
