/**
 * SfuLink, the SFU side of a CallSession, with a scripted RTCPeerConnection and a stand-in for
 * the signaling: the first offer carries the credential and publishes video with three simulcast
 * encodings; offers never overlap (changes during an exchange make exactly one more offer after
 * the answer); a binding that names a mid before the offer assigned it waits for it; unbinding
 * takes the track out of the publisher's stream; an ICE failure re-offers with `ice_restart`; a
 * refused offer rolls back and the next one carries the credential again. (Real browsers through
 * the real SFU: test/integration/calls_sfu_browser.test.ts.)
 */
import { beforeAll, describe, expect, it } from "vitest";
import { SfuLink, type SfuBinding } from "../../src/call_sfu.js";
import type { SignalPayload } from "../../src/types.js";

class FakeTrack {
  static next = 0;
  readonly id = `track${FakeTrack.next++}`;
  constructor(readonly kind: string) {}
}

class FakeStream {
  readonly #tracks: FakeTrack[] = [];
  constructor(tracks: FakeTrack[] = []) {
    this.#tracks.push(...tracks);
  }
  getTracks(): FakeTrack[] {
    return [...this.#tracks];
  }
  addTrack(t: FakeTrack): void {
    if (!this.#tracks.includes(t)) this.#tracks.push(t);
  }
  removeTrack(t: FakeTrack): void {
    const i = this.#tracks.indexOf(t);
    if (i >= 0) this.#tracks.splice(i, 1);
  }
}

interface FakeTransceiver {
  mid: string | null;
  direction: string;
  sendEncodings: RTCRtpEncodingParameters[] | undefined;
  receiver: { track: FakeTrack };
  sender: { track: FakeTrack | null; replaceTrack(t: FakeTrack | null): Promise<void> };
  stop(): void;
}

/** The parts of RTCPeerConnection SfuLink uses, with mids assigned at createOffer. */
class ScriptedPeerConnection {
  signalingState: RTCSignalingState = "stable";
  iceConnectionState: RTCIceConnectionState = "new";
  connectionState: RTCPeerConnectionState = "new";
  localDescription: RTCSessionDescriptionInit | null = null;
  remoteDescription: RTCSessionDescriptionInit | null = null;
  onicecandidate: ((e: { candidate: { candidate: string } | null }) => void) | null = null;
  oniceconnectionstatechange: (() => void) | null = null;
  onconnectionstatechange: (() => void) | null = null;
  readonly transceivers: FakeTransceiver[] = [];
  #credentials = 0;
  #restart = false;
  #nextMid = 0;

  addTransceiver(trackOrKind: FakeTrack | string, init: RTCRtpTransceiverInit = {}): FakeTransceiver {
    const kind = typeof trackOrKind === "string" ? trackOrKind : trackOrKind.kind;
    const t: FakeTransceiver = {
      mid: null,
      direction: init.direction ?? "sendrecv",
      sendEncodings: init.sendEncodings,
      receiver: { track: new FakeTrack(kind) },
      sender: {
        track: typeof trackOrKind === "string" ? null : trackOrKind,
        async replaceTrack(next) {
          this.track = next;
        },
      },
      stop() {
        this.direction = "stopped";
      },
    };
    this.transceivers.push(t);
    return t;
  }
  getTransceivers(): FakeTransceiver[] {
    return this.transceivers;
  }
  restartIce(): void {
    this.#restart = true;
  }
  async createOffer(): Promise<RTCSessionDescriptionInit> {
    await Promise.resolve();
    if (this.#restart) {
      this.#restart = false;
      this.#credentials++;
    }
    for (const t of this.transceivers) if (t.mid === null) t.mid = String(this.#nextMid++);
    const lines = this.transceivers.map((t) => `m=${t.receiver.track.kind}\r\na=mid:${t.mid}\r\na=${t.direction}\r\n`);
    return { type: "offer", sdp: `v=0\r\na=ice-ufrag:u${this.#credentials}\r\n${lines.join("")}` };
  }
  async setLocalDescription(d: RTCSessionDescriptionInit): Promise<void> {
    await Promise.resolve();
    if (d.type === "rollback") {
      this.signalingState = "stable";
      this.localDescription = null;
      return;
    }
    this.localDescription = d;
    this.signalingState = "have-local-offer";
  }
  async setRemoteDescription(d: RTCSessionDescriptionInit): Promise<void> {
    await Promise.resolve();
    if (d.type !== "answer" || this.signalingState !== "have-local-offer") throw new Error(`scripted: unexpected ${d.type}`);
    this.remoteDescription = d;
    this.signalingState = "stable";
  }
  async addIceCandidate(): Promise<void> {}
  close(): void {
    this.signalingState = "closed";
  }
  failIce(): void {
    this.iceConnectionState = "failed";
    this.oniceconnectionstatechange?.();
  }
}

beforeAll(() => {
  (globalThis as unknown as { MediaStream: unknown }).MediaStream = FakeStream;
});

const tick = () => new Promise((r) => setTimeout(r, 0));

interface Harness {
  pc: ScriptedPeerConnection;
  link: SfuLink;
  sent: SignalPayload[];
  tracks: Array<{ binding: SfuBinding; track: FakeTrack; stream: FakeStream }>;
  removed: Array<{ binding: SfuBinding; track: FakeTrack }>;
  errors: string[];
  /** Makes the next `signal` of an offer fail (the server refused it). */
  refuseNext: { value: boolean };
  answer(): Promise<void>;
}

function harness(): Harness {
  const pc = new ScriptedPeerConnection();
  const h: Omit<Harness, "link"> & { link?: SfuLink } = {
    pc,
    sent: [],
    tracks: [],
    removed: [],
    errors: [],
    refuseNext: { value: false },
    async answer() {
      await h.link!.onAnswer("v=0\r\nanswer\r\n");
      await tick();
    },
  };
  h.link = new SfuLink(
    pc as unknown as RTCPeerConnection,
    {
      async signal(signal) {
        if (signal.kind === "offer" && h.refuseNext.value) {
          h.refuseNext.value = false;
          throw new Error("refused");
        }
        h.sent.push(signal);
      },
      onTrack(binding, track, stream) {
        h.tracks.push({ binding, track: track as unknown as FakeTrack, stream: stream as unknown as FakeStream });
      },
      onTrackRemoved(binding, track) {
        h.removed.push({ binding, track: track as unknown as FakeTrack });
      },
      onConnectionState() {},
      onError(what) {
        h.errors.push(what);
      },
    },
    "v1.credential",
  );
  return h as Harness;
}

const offers = (h: Harness) => h.sent.filter((s) => s.kind === "offer");

describe("SfuLink", () => {
  it("publishes with simulcast and opens slots; the first offer carries the credential, later ones do not", async () => {
    const h = harness();
    const camera = new FakeTrack("video");
    const mic = new FakeTrack("audio");
    const stream = new FakeStream([camera, mic]);
    h.link.start(new Map([[camera, [stream]], [mic, [stream]]]) as unknown as Map<MediaStreamTrack, MediaStream[]>, { audio: 2, video: 2 });
    await tick();
    await tick();
    expect(offers(h)).toHaveLength(1);
    expect(offers(h)[0]!.credential).toBe("v1.credential");
    const video = h.pc.transceivers.find((t) => t.sender.track === camera)!;
    expect(video.direction).toBe("sendonly");
    expect(video.sendEncodings?.map((e) => e.rid)).toEqual(["q", "h", "f"]);
    expect(h.pc.transceivers.find((t) => t.sender.track === mic)!.sendEncodings).toBeUndefined();
    expect(h.pc.transceivers.filter((t) => t.direction === "recvonly").map((t) => t.receiver.track.kind).sort()).toEqual(["audio", "audio", "video", "video"]);

    // Two changes during the exchange: one more offer, after the answer, without the credential.
    h.link.addSlots(1, 1);
    h.link.negotiate();
    h.link.negotiate();
    await tick();
    expect(offers(h)).toHaveLength(1);
    await h.answer();
    await tick();
    expect(offers(h)).toHaveLength(2);
    expect(offers(h)[1]!.credential).toBeUndefined();
    await h.answer();
    expect(offers(h)).toHaveLength(2);
    expect(h.errors).toEqual([]);
  });

  it("a binding for a mid the offer has not assigned yet waits for it; unbinding removes the track from the publisher's stream", async () => {
    const h = harness();
    h.link.bind({ track: "t1", publisher: "p_bob", mid: "1" }); // before any offer: no mid yet
    expect(h.tracks).toHaveLength(0);
    h.link.start(new Map(), { audio: 1, video: 1 });
    await tick();
    await tick();
    expect(h.tracks.map((t) => [t.binding.track, t.track.kind])).toEqual([["t1", "video"]]);
    h.link.bind({ track: "t0", publisher: "p_bob", mid: "0" });
    const bobs = h.link.streamOf("p_bob") as unknown as FakeStream;
    expect(bobs.getTracks().map((t) => t.kind).sort()).toEqual(["audio", "video"]);
    // The slot of mid 1 goes to carol's video: bob's video leaves his stream.
    h.link.bind({ track: "t9", publisher: "p_carol", mid: "1" });
    expect(h.removed.map((r) => r.binding.track)).toEqual(["t1"]);
    expect(bobs.getTracks().map((t) => t.kind)).toEqual(["audio"]);
    expect((h.link.streamOf("p_carol") as unknown as FakeStream).getTracks().map((t) => t.kind)).toEqual(["video"]);
    // An unbind of a track the slot no longer carries changes nothing.
    h.link.unbind("t1", "1");
    expect(h.removed).toHaveLength(1);
    h.link.unbind("t9", "1");
    expect(h.removed.map((r) => r.binding.track)).toEqual(["t1", "t9"]);
    expect(h.link.streamOf("p_carol")).toBeUndefined();
    expect(h.link.bindings().map((b) => b.track)).toEqual(["t0"]);
  });

  it("an ICE failure re-offers with ice_restart and new credentials", async () => {
    const h = harness();
    h.link.start(new Map(), { audio: 1, video: 1 });
    await tick();
    await h.answer();
    const before = offers(h)[0]!;
    h.pc.failIce();
    await tick();
    await tick();
    const restart = offers(h)[1]!;
    expect(restart.ice_restart).toBe(true);
    expect(/a=ice-ufrag:(\S+)/.exec(restart.sdp ?? "")?.[1]).not.toBe(/a=ice-ufrag:(\S+)/.exec(before.sdp ?? "")?.[1]);
  });

  it("a refused offer rolls back; the next offer carries the credential again", async () => {
    const h = harness();
    h.refuseNext.value = true;
    h.link.start(new Map(), { audio: 1, video: 1 });
    await tick();
    await tick();
    await tick();
    expect(offers(h)).toHaveLength(0);
    expect(h.errors).toEqual(["offering to the SFU"]);
    expect(h.pc.signalingState).toBe("stable");
    h.link.negotiate();
    await tick();
    await tick();
    expect(offers(h)).toHaveLength(1);
    expect(offers(h)[0]!.credential).toBe("v1.credential");
  });
});
