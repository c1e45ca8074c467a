/** The pure decisions of perfect negotiation and the ICE wire format. */
import { describe, expect, it } from "vitest";
import {
  candidateFromWire,
  candidateToWire,
  decideRemoteDescription,
  iceUfrag,
  isIceRestart,
  needsIceRestart,
} from "../../src/negotiation.js";

const idle = { makingOffer: false, signalingState: "stable" as const, settingRemoteAnswer: false };

describe("perfect negotiation", () => {
  it("applies an offer when stable, whatever the role", () => {
    expect(decideRemoteDescription("offer", { ...idle, polite: false })).toEqual({ collision: false, ignore: false });
    expect(decideRemoteDescription("offer", { ...idle, polite: true })).toEqual({ collision: false, ignore: false });
  });

  it("on glare the impolite side ignores the remote offer and the polite side yields", () => {
    const glare = { makingOffer: false, signalingState: "have-local-offer" as const, settingRemoteAnswer: false };
    expect(decideRemoteDescription("offer", { ...glare, polite: false })).toEqual({ collision: true, ignore: true });
    expect(decideRemoteDescription("offer", { ...glare, polite: true })).toEqual({ collision: true, ignore: false });
  });

  it("counts an offer that arrives while ours is being made as a collision", () => {
    const making = { ...idle, makingOffer: true };
    expect(decideRemoteDescription("offer", { ...making, polite: false }).ignore).toBe(true);
    expect(decideRemoteDescription("offer", { ...making, polite: true }).ignore).toBe(false);
  });

  it("accepts an offer while a remote answer is being applied (not a collision)", () => {
    const answering = { makingOffer: false, signalingState: "have-local-offer" as const, settingRemoteAnswer: true };
    expect(decideRemoteDescription("offer", { ...answering, polite: false })).toEqual({ collision: false, ignore: false });
  });

  it("never ignores an answer", () => {
    const waiting = { makingOffer: false, signalingState: "have-local-offer" as const, settingRemoteAnswer: false };
    expect(decideRemoteDescription("answer", { ...waiting, polite: false }).ignore).toBe(false);
  });
});

describe("ICE restarts", () => {
  const sdp = (ufrag: string) => `v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:${ufrag}\r\na=ice-pwd:x\r\n`;

  it("reads the ufrag of an SDP", () => {
    expect(iceUfrag(sdp("abcd"))).toBe("abcd");
    expect(iceUfrag("v=0\r\n")).toBeUndefined();
  });

  it("tells a restarting offer by its new credentials, and not the first offer", () => {
    expect(isIceRestart(undefined, sdp("a1"))).toBe(false);
    expect(isIceRestart("a1", sdp("a1"))).toBe(false);
    expect(isIceRestart("a1", sdp("b2"))).toBe(true);
  });

  it("recognises the server's refusal of an offer without a restart", () => {
    expect(needsIceRestart("ice_restart_required")).toBe(true);
    expect(needsIceRestart("no_pending_offer")).toBe(false);
    expect(needsIceRestart(undefined)).toBe(false);
  });
});

describe("trickle ICE on the wire", () => {
  it("sends the candidate line, and the end of candidates for a null or empty candidate", () => {
    expect(candidateToWire({ candidate: "candidate:1 1 udp 1 1.2.3.4 5 typ host" })).toEqual({
      kind: "candidate",
      candidate: "candidate:1 1 udp 1 1.2.3.4 5 typ host",
    });
    expect(candidateToWire(null)).toEqual({ kind: "end_of_candidates" });
    expect(candidateToWire({ candidate: "" })).toEqual({ kind: "end_of_candidates" });
  });

  it("maps a received line to the bundled transport (m-line 0), with or without `a=`", () => {
    expect(candidateFromWire("a=candidate:1 1 udp 1 1.2.3.4 5 typ host")).toEqual({
      candidate: "candidate:1 1 udp 1 1.2.3.4 5 typ host",
      sdpMLineIndex: 0,
      sdpMid: null,
    });
  });
});
