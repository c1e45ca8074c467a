//! SFU mode of a call: one RTCPeerConnection to Parley's SFU, on which this client is the only
//! offerer (docs/sfu.md, "Negotiation"). It publishes its tracks on `sendonly` transceivers
//! (video with three simulcast encodings, rids `q`, `h`, `f`) and receives on `recvonly`
//! transceivers, the *receive slots*. The SFU says which remote track it binds to which slot (by
//! mid); `SfuLink` turns that into per-participant `MediaStream`s. When the SFU needs more slots
//! it asks for them and this side adds them and offers again.
//!
//! The wire (the frames carrying offers, bindings and subscriptions) is the caller's business:
//! `SfuLink` talks to its `SfuHost` only.
import { candidateFromWire, candidateToWire, iceUfrag, isIceRestart } from "./negotiation.js";
import type { SignalPayload } from "./types.js";

/** Simulcast layers of a published camera track, lowest first (docs/sfu.md, "Simulcast"). */
export const SIMULCAST_ENCODINGS: readonly RTCRtpEncodingParameters[] = [
  { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "f", scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

const ANSWER_TIMEOUT_MS = 20_000;

/** Options of SFU mode (`JoinCallOptions.sfu`). */
export interface SfuOptions {
  /** Publish video with three simulcast layers (`q`, `h`, `f`). Default true. */
  simulcast?: boolean;
  /**
   * Receive slots to open up front, per kind. Default: one per other participant and kind (at
   * least one), so that the usual call needs no second offer. The SFU asks for more when needed.
   */
  slots?: { audio?: number; video?: number };
}

/** A binding the SFU announced: `track` of `publisher` arrives on this client's `mid`. */
export interface SfuBinding {
  track: string;
  publisher: string;
  mid: string;
}

/** What `SfuLink` needs from the call. */
export interface SfuHost {
  /** Sends a signal (offer, candidate, end of candidates) to the SFU. Resolves on the server's ack. */
  signal(signal: SignalPayload): Promise<void>;
  /** A bound remote track is ready to play (or its slot was re-bound to another track). */
  onTrack(binding: SfuBinding, track: MediaStreamTrack, stream: MediaStream): void;
  /** A slot no longer carries `binding.track`. */
  onTrackRemoved(binding: SfuBinding, track: MediaStreamTrack, stream: MediaStream): void;
  onConnectionState(state: RTCPeerConnectionState): void;
  onError(what: string, error: unknown): void;
}

/** The connection to the SFU. */
export class SfuLink {
  readonly pc: RTCPeerConnection;
  readonly #host: SfuHost;
  readonly #simulcast: boolean;
  /** Local track → its transceiver. */
  readonly #published = new Map<MediaStreamTrack, RTCRtpTransceiver>();
  /** mid → binding, for bound slots. */
  readonly #bindings = new Map<string, SfuBinding>();
  /** Bindings whose mid has no transceiver yet (an answer still on its way). */
  readonly #pendingBindings = new Map<string, SfuBinding>();
  /** Remote participant → the stream holding its bound tracks. */
  readonly #streams = new Map<string, MediaStream>();
  #offering = false;
  #again = false;
  #restartPending = false;
  #localUfrag: string | undefined;
  #closed = false;
  /** Candidates gathered before the offer went out are sent after it. */
  #offerSent = false;
  #heldCandidates: SignalPayload[] = [];
  #answerWaiter: ((sdp: string) => void) | undefined;

  readonly #credential: string;

  /** `credential` (from the join answer) goes in the first offer. */
  constructor(pc: RTCPeerConnection, host: SfuHost, credential: string, options: SfuOptions = {}) {
    this.pc = pc;
    this.#host = host;
    this.#credential = credential;
    this.#simulcast = options.simulcast !== false;
    pc.onicecandidate = (event) => {
      if (this.#closed) return;
      const signal = candidateToWire(event.candidate) as SignalPayload;
      if (!this.#offerSent) {
        this.#heldCandidates.push(signal);
        return;
      }
      void this.#host.signal(signal).catch(() => {
        /* a trickled candidate refused or lost: the SFU is ICE-lite and learns our address from checks */
      });
    };
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === "failed") this.restartIce();
    };
    pc.onconnectionstatechange = () => {
      if (!this.#closed) this.#host.onConnectionState(pc.connectionState);
    };
  }

  /** Whether the connection to the SFU is up. */
  get connected(): boolean {
    return this.pc.connectionState === "connected";
  }

  /** The bindings in force: which remote track arrives on which mid. */
  bindings(): SfuBinding[] {
    return [...this.#bindings.values()];
  }

  /** The stream of one remote participant's bound tracks, if any is bound. */
  streamOf(participantId: string): MediaStream | undefined {
    return this.#streams.get(participantId);
  }

  /** Publishes the local tracks and opens the receive slots; the first offer follows. */
  start(tracks: Map<MediaStreamTrack, MediaStream[]>, slots: { audio: number; video: number }): void {
    for (const [track, streams] of tracks) this.#publish(track, streams);
    this.addSlots(slots.audio, slots.video);
    this.negotiate();
  }

  addTrack(track: MediaStreamTrack, streams: MediaStream[]): void {
    if (this.#closed || this.#published.has(track)) return;
    this.#publish(track, streams);
    this.negotiate();
  }

  removeTrack(track: MediaStreamTrack): void {
    const t = this.#published.get(track);
    if (this.#closed || !t) return;
    this.#published.delete(track);
    // `stop()` takes the m-line out for good; the SFU unpublishes the track on the next offer.
    t.stop();
    this.negotiate();
  }

  async replaceTrack(previous: MediaStreamTrack, next: MediaStreamTrack | null): Promise<void> {
    const t = this.#published.get(previous);
    if (this.#closed || !t) return;
    this.#published.delete(previous);
    if (next) this.#published.set(next, t);
    await t.sender.replaceTrack(next);
  }

  /** Adds receive-only transceivers (the SFU asked for them); negotiate() sends the offer. */
  addSlots(audio: number, video: number): void {
    if (this.#closed) return;
    for (let i = 0; i < audio; i++) this.pc.addTransceiver("audio", { direction: "recvonly" });
    for (let i = 0; i < video; i++) this.pc.addTransceiver("video", { direction: "recvonly" });
  }

  restartIce(): void {
    if (this.#closed) return;
    this.#restartPending = true;
    this.negotiate();
  }

  /**
   * Offers (now, or once the outstanding offer is answered). This side is the only offerer, so
   * offers simply queue: one at a time, the latest state each time.
   */
  negotiate(): void {
    if (this.#closed) return;
    if (this.#offering) {
      this.#again = true;
      return;
    }
    void this.#offer();
  }

  /** The SFU's answer (relayed as a signal from the SFU). */
  async onAnswer(sdp: string): Promise<void> {
    if (this.#closed) return;
    if (this.pc.signalingState !== "have-local-offer") return; // stale or duplicate
    const waiter = this.#answerWaiter;
    this.#answerWaiter = undefined;
    try {
      await this.pc.setRemoteDescription({ type: "answer", sdp });
    } catch (e) {
      this.#host.onError("applying the SFU's answer", e);
    }
    waiter?.(sdp);
    this.#resolvePending();
  }

  /** A candidate of the SFU (ICE-lite: its candidates are in the answer, trickling is optional). */
  async onCandidate(candidate: string): Promise<void> {
    if (this.#closed || !this.pc.remoteDescription) return;
    try {
      await this.pc.addIceCandidate(candidateFromWire(candidate));
    } catch {
      /* a candidate for a superseded description */
    }
  }

  /** The SFU bound `track` of `publisher` to our slot `mid`. */
  bind(binding: SfuBinding): void {
    if (this.#closed) return;
    const previous = this.#bindings.get(binding.mid);
    if (previous && previous.track !== binding.track) this.#unbindMid(binding.mid);
    if (previous?.track === binding.track && previous.publisher === binding.publisher) return;
    const transceiver = this.#transceiver(binding.mid);
    if (!transceiver) {
      this.#pendingBindings.set(binding.mid, binding);
      return;
    }
    this.#bindings.set(binding.mid, binding);
    const track = transceiver.receiver.track;
    let stream = this.#streams.get(binding.publisher);
    if (!stream) {
      stream = new MediaStream();
      this.#streams.set(binding.publisher, stream);
    }
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    this.#host.onTrack(binding, track, stream);
  }

  /** The slot `mid` no longer carries `track`. */
  unbind(track: string, mid: string): void {
    this.#pendingBindings.delete(mid);
    const b = this.#bindings.get(mid);
    if (!b || b.track !== track) return;
    this.#unbindMid(mid);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.pc.onicecandidate = null;
    this.pc.oniceconnectionstatechange = null;
    this.pc.onconnectionstatechange = null;
    this.pc.close();
    this.#answerWaiter = undefined;
  }

  // ---- internals ----

  #publish(track: MediaStreamTrack, streams: MediaStream[]): void {
    const init: RTCRtpTransceiverInit = { direction: "sendonly", streams };
    if (track.kind === "video" && this.#simulcast) init.sendEncodings = SIMULCAST_ENCODINGS.map((e) => ({ ...e }));
    this.#published.set(track, this.pc.addTransceiver(track, init));
  }

  #transceiver(mid: string): RTCRtpTransceiver | undefined {
    return this.pc.getTransceivers().find((t) => t.mid === mid);
  }

  #unbindMid(mid: string): void {
    const b = this.#bindings.get(mid);
    if (!b) return;
    this.#bindings.delete(mid);
    const transceiver = this.#transceiver(mid);
    const stream = this.#streams.get(b.publisher);
    if (!transceiver || !stream) return;
    const track = transceiver.receiver.track;
    stream.removeTrack(track);
    if (stream.getTracks().length === 0) this.#streams.delete(b.publisher);
    this.#host.onTrackRemoved(b, track, stream);
  }

  #resolvePending(): void {
    for (const [mid, binding] of [...this.#pendingBindings]) {
      if (!this.#transceiver(mid)) continue;
      this.#pendingBindings.delete(mid);
      this.bind(binding);
    }
  }

  async #offer(): Promise<void> {
    this.#offering = true;
    try {
      for (;;) {
        this.#again = false;
        if (this.#closed) return;
        if (this.pc.signalingState !== "stable") return;
        if (this.#restartPending) this.pc.restartIce();
        const offer = await this.pc.createOffer();
        await this.pc.setLocalDescription(offer);
        const local = this.pc.localDescription;
        if (this.#closed || !local) return;
        const iceRestart = this.#restartPending || isIceRestart(this.#localUfrag, local.sdp);
        this.#restartPending = false;
        this.#localUfrag = iceUfrag(local.sdp);
        // Bindings may name mids the offer has just assigned.
        this.#resolvePending();
        let timer: ReturnType<typeof setTimeout> | undefined;
        const answered = new Promise<string>((resolve, reject) => {
          this.#answerWaiter = resolve;
          timer = setTimeout(() => reject(new Error("no answer from the SFU within 20 s")), ANSWER_TIMEOUT_MS);
        });
        answered.catch(() => {});
        const signal: SignalPayload = { kind: "offer", sdp: local.sdp, ice_restart: iceRestart };
        if (!this.#offerSent) signal.credential = this.#credential;
        try {
          await this.#host.signal(signal);
        } catch (e) {
          clearTimeout(timer);
          throw e;
        }
        if (!this.#offerSent) {
          this.#offerSent = true;
          for (const c of this.#heldCandidates.splice(0)) void this.#host.signal(c).catch(() => {});
        }
        try {
          await answered;
        } finally {
          clearTimeout(timer);
        }
        if (!this.#again) return;
      }
    } catch (e) {
      this.#answerWaiter = undefined;
      if (!this.#closed) {
        // Go back to stable so that a later negotiate() can offer again.
        if (this.pc.signalingState === "have-local-offer") {
          await this.pc.setLocalDescription({ type: "rollback" }).catch(() => {});
        }
        this.#host.onError("offering to the SFU", e);
      }
    } finally {
      this.#offering = false;
    }
  }
}
