/**
 * Chromium sanity check, independent of Parley: two RTCPeerConnections in one page, fake camera,
 * only 127.0.0.1 candidates passed between them, and video is decoded. When this fails, the
 * browser or its flags are at fault, not the app.
 */
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import type { Browser } from "playwright-core";
import { launchChromium, newContext } from "./harness/browser.js";
import { isLoopbackCandidate } from "./harness/loopback.js";
import { within } from "./harness/wait.js";

let browser: Browser;
const page = createServer((_, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end("<!doctype html><title>loopback</title><p>loopback check</p>");
});

before(async () => {
  await new Promise<void>((resolve) => page.listen(0, "127.0.0.1", resolve));
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  page.close();
});

test("Chromium decodes video over a 127.0.0.1-only peer connection", async () => {
  const origin = `http://localhost:${(page.address() as AddressInfo).port}`;
  const context = await newContext(browser, origin);
  const tab = await context.newPage();
  await tab.goto(origin);
  const result = await within(
    "two loopback peer connections decoding 20 frames",
    30_000,
    tab.evaluate(async (filterSource: string) => {
      const isLoopback = new Function(`return (${filterSource})`)() as (c: string) => boolean;
      const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
      const a = new RTCPeerConnection();
      const b = new RTCPeerConnection();
      const gathered: string[] = [];
      const passed: string[] = [];
      const wire = (from: RTCPeerConnection, to: RTCPeerConnection) => {
        from.onicecandidate = (e) => {
          if (!e.candidate || e.candidate.candidate === "") return;
          gathered.push(e.candidate.candidate);
          if (!isLoopback(e.candidate.candidate)) return;
          passed.push(e.candidate.candidate);
          void to.addIceCandidate(e.candidate);
        };
      };
      wire(a, b);
      wire(b, a);
      for (const track of stream.getTracks()) a.addTrack(track, stream);
      await a.setLocalDescription();
      await b.setRemoteDescription(a.localDescription!);
      await b.setLocalDescription();
      await a.setRemoteDescription(b.localDescription!);
      const decoded = async () => {
        let frames = 0;
        (await b.getStats()).forEach((s: { type: string; kind?: string; framesDecoded?: number }) => {
          if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded ?? 0;
        });
        return frames;
      };
      while ((await decoded()) < 20) await new Promise((r) => setTimeout(r, 200));
      let pair = "";
      (await b.getStats()).forEach((s: { type: string; selected?: boolean; state?: string; localCandidateId?: string; remoteCandidateId?: string; nominated?: boolean }) => {
        if (s.type === "candidate-pair" && s.state === "succeeded" && s.nominated) pair = `${s.localCandidateId}->${s.remoteCandidateId}`;
      });
      const frames = await decoded();
      a.close();
      b.close();
      return { frames, gathered, passed, pair };
    }, isLoopbackCandidate.toString()),
  );
  assert.ok(result.frames >= 20, `decoded ${result.frames} frames`);
  assert.ok(result.passed.length > 0, `no 127.0.0.1 candidate among ${JSON.stringify(result.gathered)}`);
  assert.ok(result.passed.every(isLoopbackCandidate));
  await context.close();
});
