/**
 * Watches a page's WebSocket frames (as Chromium saw them) and keeps its call signals, so a test
 * can prove that only 127.0.0.1 candidates were signalled and that an ICE restart happened.
 */
import type { Page } from "playwright-core";
import { isLoopbackCandidate } from "./loopback.js";

export interface SeenSignal {
  direction: "sent" | "received";
  kind: string;
  iceRestart: boolean;
  at: number;
}

export interface SignalLog {
  signals: SeenSignal[];
  /** Candidates (trickled or inside an SDP) on an address other than 127.0.0.1. */
  nonLoopback: string[];
  /** Frames of each `type` sent by the page (e.g. `call.attach`). */
  sentTypes: Map<string, number>;
  /** WebSockets the page opened. */
  sockets: number;
}

export function watchSignals(page: Page): SignalLog {
  const log: SignalLog = { signals: [], nonLoopback: [], sentTypes: new Map(), sockets: 0 };
  page.on("websocket", (ws) => {
    log.sockets += 1;
    const onFrame = (direction: SeenSignal["direction"]) => (frame: { payload: string | Buffer }) => {
      let parsed: { type?: string; signal?: { kind?: string; sdp?: string | null; candidate?: string | null; ice_restart?: boolean } };
      try {
        parsed = JSON.parse(frame.payload.toString()) as typeof parsed;
      } catch {
        return;
      }
      if (direction === "sent" && parsed.type) log.sentTypes.set(parsed.type, (log.sentTypes.get(parsed.type) ?? 0) + 1);
      if (parsed.type !== "call.signal" || !parsed.signal) return;
      const s = parsed.signal;
      log.signals.push({ direction, kind: s.kind ?? "?", iceRestart: s.ice_restart === true, at: Date.now() });
      if (s.candidate && !isLoopbackCandidate(s.candidate)) log.nonLoopback.push(s.candidate);
      for (const line of (s.sdp ?? "").split("\r\n")) {
        if (line.startsWith("a=candidate:") && !isLoopbackCandidate(line)) log.nonLoopback.push(line);
      }
    };
    ws.on("framesent", onFrame("sent"));
    ws.on("framereceived", onFrame("received"));
  });
  return log;
}
