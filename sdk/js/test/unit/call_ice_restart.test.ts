/**
 * CallSession's ICE restart after a network failure, with a scripted RTCPeerConnection and a
 * stand-in for the client's signaling: when `iceConnectionState` becomes "failed" the session
 * calls `restartIce()` and sends an offer with `ice_restart: true` and new ICE credentials.
 * (Real browsers in a call, including the restart after a reconnect of the realtime client:
 * test/integration/calls_browser.test.ts.)
 */
import { afterEach, describe, expect, it, vi } from "vitest";
import { joinCall, type CallSession } from "../../src/call.js";
import type { ParleyClient } from "../../src/client.js";
import { iceUfrag } from "../../src/negotiation.js";
import type { CallSignalEvent, JoinedCall, SignalPayload } from "../../src/types.js";

const sdp = (type: string, ufrag: string) =>
  `v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=${type}\r\nt=0 0\r\na=group:BUNDLE 0\r\n` +
  `m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=ice-ufrag:${ufrag}\r\na=ice-pwd:pwd-${ufrag}\r\n`;

/**
 * What CallSession uses of an RTCPeerConnection, following the specification's rules for the
 * parts involved: `restartIce()` and added transceivers make negotiation needed, and
 * `negotiationneeded` fires (in a later task) only in "stable" — at once, or when the pending
 * exchange completes. The implicit `setLocalDescription()` makes an offer (with new ICE
 * credentials after `restartIce()`) or, in "have-remote-offer", an answer.
 */
class ScriptedPeerConnection {
  static all: ScriptedPeerConnection[] = [];
  signalingState: RTCSignalingState = "stable";
  iceConnectionState: RTCIceConnectionState = "new";
  connectionState: RTCPeerConnectionState = "new";
  localDescription: RTCSessionDescriptionInit | null = null;
  remoteDescription: RTCSessionDescriptionInit | null = null;
  onnegotiationneeded: (() => void) | null = null;
  onicecandidate: ((e: { candidate: { candidate: string } | null }) => void) | null = null;
  ontrack: ((e: unknown) => void) | null = null;
  oniceconnectionstatechange: (() => void) | null = null;
  onconnectionstatechange: (() => void) | null = null;
  restartIceCalls = 0;
  readonly transceivers: Array<{ kind: string; direction: string | undefined }> = [];
  #credentials = 0;
  #restartIce = false;
  #negotiationNeeded = false;

  constructor(readonly configuration: RTCConfiguration) {
    ScriptedPeerConnection.all.push(this);
  }

  get ufrag(): string {
    return `ufrag${this.#credentials}`;
  }

  addTransceiver(kind: string, init?: { direction?: string }): void {
    this.transceivers.push({ kind, direction: init?.direction });
    this.#needNegotiation();
  }

  getTransceivers(): [] {
    return [];
  }

  getSenders(): [] {
    return [];
  }

  restartIce(): void {
    this.restartIceCalls++;
    this.#restartIce = true;
    this.#needNegotiation();
  }

  async setLocalDescription(description?: RTCSessionDescriptionInit): Promise<void> {
    await Promise.resolve();
    if (description) throw new Error("scripted: only the implicit setLocalDescription() is supported");
    if (this.signalingState === "stable" || this.signalingState === "have-local-offer") {
      if (this.#restartIce) {
        this.#restartIce = false;
        this.#credentials++;
      }
      this.#negotiationNeeded = false;
      this.localDescription = { type: "offer", sdp: sdp("offer", this.ufrag) };
      this.signalingState = "have-local-offer";
    } else if (this.signalingState === "have-remote-offer") {
      this.localDescription = { type: "answer", sdp: sdp("answer", this.ufrag) };
      this.#stable();
    } else {
      throw new Error(`scripted: setLocalDescription() in ${this.signalingState}`);
    }
  }

  async setRemoteDescription(description: RTCSessionDescriptionInit): Promise<void> {
    await Promise.resolve();
    if (description.type === "answer" && this.signalingState === "have-local-offer") {
      this.remoteDescription = description;
      this.#stable();
    } else if (description.type === "offer" && this.signalingState === "stable") {
      this.remoteDescription = description;
      this.signalingState = "have-remote-offer";
    } else {
      throw new Error(`scripted: setRemoteDescription(${description.type}) in ${this.signalingState}`);
    }
  }

  async addIceCandidate(): Promise<void> {}

  close(): void {
    this.signalingState = "closed";
  }

  /** The ICE agent's side: a new iceConnectionState, reported as browsers do. */
  setIceConnectionState(state: RTCIceConnectionState): void {
    this.iceConnectionState = state;
    this.oniceconnectionstatechange?.();
  }

  #needNegotiation(): void {
    this.#negotiationNeeded = true;
    if (this.signalingState === "stable") this.#fireNegotiationNeeded();
  }

  #stable(): void {
    this.signalingState = "stable";
    if (this.#negotiationNeeded) this.#fireNegotiationNeeded();
  }

  #fireNegotiationNeeded(): void {
    setTimeout(() => {
      if (this.#negotiationNeeded && this.signalingState === "stable") this.onnegotiationneeded?.();
    }, 0);
  }
}

/** Stands in for ParleyClient: records the frames sent and delivers relayed signals. */
class SignalingStub {
  readonly sent: Array<Record<string, unknown>> = [];
  readonly connection = { state: "connected", on: () => () => {} };
  readonly rest = {
    joinCall: async (callId: string): Promise<JoinedCall> => ({
      call: { id: callId, channel_id: "ch_1", mode: "p2p", started_by: "bob", started_at: "2026-01-01T00:00:00Z", participants: [] },
      participant_id: "part_me",
      // Bob was there first: he is impolite towards us, we are polite towards him and offer.
      peers: [{ participant_id: "part_bob", user_id: "bob", role: "polite" }],
      ice_servers: [],
    }),
    leaveCall: async () => {},
  };
  readonly #listeners = new Map<string, Set<(value: unknown) => void>>();

  isSubscribed(): boolean {
    return true;
  }

  on(name: string, listener: (value: unknown) => void): () => void {
    const set = this.#listeners.get(name) ?? new Set();
    this.#listeners.set(name, set);
    set.add(listener);
    return () => set.delete(listener);
  }

  async request(frame: Record<string, unknown>): Promise<{ type: "ack"; id: string }> {
    this.sent.push(frame);
    return { type: "ack", id: `req_${this.sent.length}` };
  }

  /** Signals sent to a peer, in order. */
  signals(kind?: SignalPayload["kind"]): SignalPayload[] {
    return this.sent
      .filter((f) => f.type === "call.signal")
      .map((f) => f.signal as SignalPayload)
      .filter((s) => kind === undefined || s.kind === kind);
  }

  /** Bob's signal, relayed by the server. */
  relay(signal: SignalPayload): void {
    const frame: CallSignalEvent = { type: "call.signal", call_id: "call_1", from: "part_bob", to: "part_me", role: "polite", signal };
    for (const listener of this.#listeners.get("call.signal") ?? []) listener(frame);
  }
}

async function join(): Promise<{ stub: SignalingStub; call: CallSession; pc: ScriptedPeerConnection }> {
  ScriptedPeerConnection.all = [];
  const stub = new SignalingStub();
  const call = await joinCall(stub as unknown as ParleyClient, "call_1", {
    RTCPeerConnection: ScriptedPeerConnection as unknown as typeof RTCPeerConnection,
  });
  await vi.waitFor(() => expect(stub.signals("offer")).toHaveLength(1));
  const pc = ScriptedPeerConnection.all[0]!;
  expect(ScriptedPeerConnection.all).toHaveLength(1);
  expect(stub.sent[0]).toMatchObject({ type: "call.attach", call_id: "call_1", participant_id: "part_me" });
  return { stub, call, pc };
}

/** Bob answers our last offer; waits until the session has applied the answer. */
async function answer(stub: SignalingStub, pc: ScriptedPeerConnection, ufrag: string): Promise<void> {
  stub.relay({ kind: "answer", sdp: sdp("answer", ufrag) });
  await vi.waitFor(() => expect(iceUfrag(pc.remoteDescription?.sdp)).toBe(ufrag));
}

/** Lets every queued task and microtask run (negotiationneeded, the SDK's promise chains). */
const settle = () => new Promise((resolve) => setTimeout(resolve, 20));

let current: CallSession | undefined;
afterEach(async () => {
  await current?.leave();
  current = undefined;
});

describe("CallSession: ICE restart when ICE fails on its own", () => {
  it("restarts ICE after iceConnectionState 'failed': restartIce() and an offer with ice_restart: true and new credentials", async () => {
    const { stub, call, pc } = await join();
    current = call;
    const first = stub.signals("offer")[0]!;
    expect(first.ice_restart).toBe(false);
    await answer(stub, pc, "bob1");
    pc.setIceConnectionState("checking");
    pc.setIceConnectionState("connected");

    // A network hiccup alone restarts nothing: browsers recover from "disconnected" by themselves.
    pc.setIceConnectionState("disconnected");
    await settle();
    expect(pc.restartIceCalls).toBe(0);
    expect(stub.signals("offer")).toHaveLength(1);

    pc.setIceConnectionState("failed");
    expect(pc.restartIceCalls, "restartIce() called on the failure").toBeGreaterThan(0);
    await vi.waitFor(() => expect(stub.signals("offer")).toHaveLength(2));
    const restart = stub.signals("offer")[1]!;
    expect(restart.ice_restart).toBe(true);
    expect(iceUfrag(restart.sdp ?? "")).toBeDefined();
    expect(iceUfrag(restart.sdp ?? ""), "new ICE credentials").not.toBe(iceUfrag(first.sdp ?? ""));
    expect(stub.sent.at(-1)).toMatchObject({ type: "call.signal", call_id: "call_1", from: "part_me", to: "part_bob" });

    // Bob answers with new credentials of his own; ICE connects again and nothing more is sent.
    await answer(stub, pc, "bob2");
    pc.setIceConnectionState("checking");
    pc.setIceConnectionState("connected");
    await settle();
    expect(stub.signals("offer")).toHaveLength(2);
    expect(pc.signalingState).toBe("stable");
    expect(call.state).toBe("active");
  });

  it("restarts ICE once the exchange under way completes when ICE fails in the middle of it", async () => {
    const { stub, call, pc } = await join();
    current = call;
    pc.setIceConnectionState("checking");
    pc.setIceConnectionState("failed"); // before bob's answer to our first offer
    expect(pc.restartIceCalls).toBeGreaterThan(0);
    await settle();
    expect(stub.signals("offer"), "no second offer while the first is unanswered").toHaveLength(1);

    await answer(stub, pc, "bob1");
    await vi.waitFor(() => expect(stub.signals("offer")).toHaveLength(2));
    const [first, restart] = stub.signals("offer");
    expect(restart!.ice_restart).toBe(true);
    expect(iceUfrag(restart!.sdp ?? "")).not.toBe(iceUfrag(first!.sdp ?? ""));
  });

  it("restarts ICE again when the restarted session fails too", async () => {
    const { stub, call, pc } = await join();
    current = call;
    await answer(stub, pc, "bob1");
    const ufrags = new Set([iceUfrag(stub.signals("offer")[0]!.sdp ?? "")]);
    for (let round = 1; round <= 3; round++) {
      pc.setIceConnectionState("failed");
      await vi.waitFor(() => expect(stub.signals("offer")).toHaveLength(round + 1));
      const offer = stub.signals("offer")[round]!;
      expect(offer.ice_restart).toBe(true);
      ufrags.add(iceUfrag(offer.sdp ?? ""));
      await answer(stub, pc, `bob${round + 1}`);
      pc.setIceConnectionState("checking");
    }
    expect(ufrags.size, "new credentials for every restart").toBe(4);
  });
});
