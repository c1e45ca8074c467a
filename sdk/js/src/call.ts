//! Calls: `CallSession` owns one RTCPeerConnection per remote participant (P2P mesh) and runs
//! perfect negotiation on each through Parley's signaling relay, with the role the server
//! assigned to the pair. It trickles ICE, renegotiates when tracks change, restarts ICE after a
//! network failure or a reconnect of the realtime client (re-attaching first), and reports
//! participants and remote tracks as events.
//!
//! It never decides roles itself (the server does) and never looks inside SDP except for the ICE
//! ufrag, to tell the server whether an offer restarts ICE.
import type { ParleyClient } from "./client.js";
import type { ConnectionStateChange } from "./connection.js";
import { Emitter } from "./emitter.js";
import { ParleyError } from "./errors.js";
import {
  candidateFromWire,
  candidateToWire,
  decideRemoteDescription,
  iceUfrag,
  isIceRestart,
  needsIceRestart,
  type SignalingStateLike,
} from "./negotiation.js";
import type {
  CallSignalEvent,
  ChannelEventOf,
  IceServer,
  JoinedCall,
  LeaveReason,
  NegotiationRole,
  SignalPayload,
} from "./types.js";

export interface JoinCallOptions {
  /** Tracks to send from the start (e.g. from `getUserMedia`). More with `addTrack` later. */
  stream?: MediaStream;
  /** RTCPeerConnection constructor. Default `globalThis.RTCPeerConnection`. */
  RTCPeerConnection?: typeof RTCPeerConnection;
  /**
   * Extra configuration of every RTCPeerConnection. `iceServers` defaults to the ones the server
   * handed out with the join; `bundlePolicy` is always `max-bundle` (see `candidateFromWire`).
   */
  rtcConfiguration?: RTCConfiguration;
  /** Receive audio/video even when not sending that kind. Default both true. */
  receive?: { audio?: boolean; video?: boolean };
}

export type CallState = "active" | "reconnecting" | "left" | "ended";

export interface CallPeerInfo {
  participantId: string;
  userId: string;
  /** Your role in perfect negotiation with this peer. */
  role: NegotiationRole;
}

export type CallEvents = {
  /** A participant is in the call with you (from the join answer, their join, or their first signal). */
  "peer.joined": CallPeerInfo;
  /** A participant left (their RTCPeerConnection is closed). */
  "peer.left": CallPeerInfo & { reason: LeaveReason | "unknown" };
  /** A remote track arrived. */
  track: CallPeerInfo & { track: MediaStreamTrack; streams: readonly MediaStream[] };
  /** The RTCPeerConnection of a peer changed its `connectionState`. */
  "peer.connectionstatechange": CallPeerInfo & { state: RTCPeerConnectionState };
  /** A peer's realtime connection dropped / came back (media may pause; an ICE restart follows). */
  "peer.reconnecting": CallPeerInfo;
  "peer.reconnected": CallPeerInfo;
  /** The call state changed (`reconnecting` while your own realtime connection is down). */
  statechange: { state: CallState; reason?: string };
  /** You are out of the call: you left, the call ended, or you were removed / timed out. */
  ended: { reason: LeaveReason | "call_ended" | "left" };
  /** Something failed in negotiation with a peer (the call goes on). */
  error: ParleyError;
};

/**
 * Joins a call with `client`: REST join, `call.attach` on the realtime connection, then one
 * RTCPeerConnection per participant already there (this side offers to each).
 */
export async function joinCall(client: ParleyClient, callId: string, options: JoinCallOptions = {}): Promise<CallSession> {
  const PC = options.RTCPeerConnection ?? (globalThis as { RTCPeerConnection?: typeof RTCPeerConnection }).RTCPeerConnection;
  if (!PC) {
    throw new TypeError("parley: no RTCPeerConnection; pass the `RTCPeerConnection` option (calls need WebRTC)");
  }
  if (client.connection.state !== "connected") await client.connect();
  const joined = await client.rest.joinCall(callId);
  const channelId = joined.call.channel_id;
  // Participants joining and leaving are channel events: the session needs the subscription.
  const alreadySubscribed = client.isSubscribed(channelId);
  if (!alreadySubscribed) await client.subscribe(channelId);
  const session = new CallSession(client, joined, PC, options, !alreadySubscribed);
  try {
    await session._attach();
  } catch (e) {
    await session.leave().catch(() => {});
    throw e;
  }
  session._start(joined);
  return session;
}

/** A call you are in. Create with `client.joinCall(callId)` or `client.startCall(channelId)`. */
export class CallSession extends Emitter<CallEvents> {
  readonly callId: string;
  readonly channelId: string;
  /** Your participant id in this call. */
  readonly participantId: string;
  /** The ICE servers the server handed out with the join. */
  readonly iceServers: readonly IceServer[];

  readonly #client: ParleyClient;
  readonly #PC: typeof RTCPeerConnection;
  readonly #options: JoinCallOptions;
  readonly #unsubscribeOnLeave: boolean;
  readonly #links = new Map<string, PeerLink>();
  readonly #known = new Map<string, CallPeerInfo>();
  /** Local tracks and the streams they belong to. */
  readonly #tracks = new Map<MediaStreamTrack, MediaStream[]>();
  #state: CallState = "active";
  readonly #offs: Array<() => void> = [];

  /** @internal Use `joinCall`. */
  constructor(
    client: ParleyClient,
    joined: JoinedCall,
    PC: typeof RTCPeerConnection,
    options: JoinCallOptions,
    unsubscribeOnLeave: boolean,
  ) {
    super();
    this.#client = client;
    this.callId = joined.call.id;
    this.channelId = joined.call.channel_id;
    this.participantId = joined.participant_id;
    this.iceServers = joined.ice_servers;
    this.#PC = PC;
    this.#options = options;
    this.#unsubscribeOnLeave = unsubscribeOnLeave;
    for (const track of options.stream?.getTracks() ?? []) this.#tracks.set(track, [options.stream as MediaStream]);
  }

  get state(): CallState {
    return this.#state;
  }

  /** The peers you are connected (or connecting) to. */
  peers(): CallPeerInfo[] {
    return [...this.#links.values()].map((l) => l.info);
  }

  /** The RTCPeerConnection to one peer (e.g. for `getStats()`), if there is one. */
  peerConnection(participantId: string): RTCPeerConnection | undefined {
    return this.#links.get(participantId)?.pc;
  }

  /** Sends a track to every peer (and to peers who join later); renegotiates. */
  addTrack(track: MediaStreamTrack, ...streams: MediaStream[]): void {
    this.#tracks.set(track, streams);
    for (const link of this.#links.values()) link.addTrack(track, streams);
  }

  /** Stops sending a track to every peer; renegotiates. The track itself is not stopped. */
  removeTrack(track: MediaStreamTrack): void {
    this.#tracks.delete(track);
    for (const link of this.#links.values()) link.removeTrack(track);
  }

  /**
   * Sends `next` instead of `previous` to every peer without renegotiating (switching camera,
   * muting by sending `null`). `previous` must be a track given to `addTrack` or in `stream`.
   */
  async replaceTrack(previous: MediaStreamTrack, next: MediaStreamTrack | null): Promise<void> {
    const streams = this.#tracks.get(previous) ?? [];
    this.#tracks.delete(previous);
    if (next) this.#tracks.set(next, streams);
    await Promise.all([...this.#links.values()].map((link) => link.replaceTrack(previous, next)));
  }

  /** Restarts ICE with every peer (also done on its own after a failure or a reconnect). */
  restartIce(): void {
    for (const link of this.#links.values()) link.restartIce();
  }

  /** Leaves the call: tells the server, closes every RTCPeerConnection. */
  async leave(): Promise<void> {
    if (this.#state === "left" || this.#state === "ended") return;
    this.#finish("left");
    try {
      await this.#client.rest.leaveCall(this.callId, this.participantId);
    } finally {
      if (this.#unsubscribeOnLeave) await this.#client.unsubscribe(this.channelId).catch(() => {});
    }
  }

  // ---- internals ----

  /** @internal */
  async _attach(): Promise<void> {
    await this.#client.request({ type: "call.attach", call_id: this.callId, participant_id: this.participantId });
  }

  /** @internal Wires events and offers to every participant already there. */
  _start(joined: JoinedCall): void {
    const c = this.#client;
    this.#offs.push(
      c.on("call.signal", (frame) => this.#onSignal(frame)),
      c.on("call.participant_joined", (e) => this.#onJoined(e)),
      c.on("call.participant_left", (e) => this.#onLeft(e)),
      c.on("call.ended", (e) => {
        if (e.call_id === this.callId) this.#finish("ended", "call_ended");
      }),
      c.on("call.participant_reconnecting", (e) => {
        if (e.call_id !== this.callId) return;
        const info = this.#known.get(e.participant_id);
        if (info) this.emit("peer.reconnecting", info);
      }),
      c.on("call.participant_reconnected", (e) => {
        if (e.call_id !== this.callId) return;
        const link = this.#links.get(e.participant_id);
        link?.expectIceRestart();
        const info = this.#known.get(e.participant_id);
        if (info) this.emit("peer.reconnected", info);
      }),
      c.connection.on("statechange", (change) => this.#onConnection(change)),
    );
    // Offer to everyone already there on the next task, so that listeners attached right after
    // `await joinCall(...)` see their `peer.joined` and every later event.
    setTimeout(() => {
      if (this.#state === "left" || this.#state === "ended") return;
      for (const peer of joined.peers) {
        const info = { participantId: peer.participant_id, userId: peer.user_id, role: peer.role };
        this.#link(info, true);
      }
    }, 0);
  }

  /** @internal Sends a signal to a peer; the ack says whether a glare rolled our offer back. */
  async _signal(to: string, signal: SignalPayload): Promise<{ rolledBack: boolean }> {
    const ack = await this.#client.request({
      type: "call.signal",
      call_id: this.callId,
      from: this.participantId,
      to,
      signal,
    });
    return { rolledBack: ack.rolled_back === true };
  }

  /** @internal */
  _emit<K extends keyof CallEvents>(name: K, value: CallEvents[K]): void {
    this.emit(name, value);
  }

  #link(info: CallPeerInfo, initiator: boolean): PeerLink {
    let link = this.#links.get(info.participantId);
    if (link) return link;
    const configuration: RTCConfiguration = {
      iceServers: this.iceServers.map((s) => ({
        urls: s.urls,
        ...(s.username ? { username: s.username } : {}),
        ...(s.credential ? { credential: s.credential } : {}),
      })),
      ...this.#options.rtcConfiguration,
      bundlePolicy: "max-bundle",
    };
    link = new PeerLink(this, info, new this.#PC(configuration));
    this.#links.set(info.participantId, link);
    if (!this.#known.has(info.participantId)) {
      this.#known.set(info.participantId, info);
      this.emit("peer.joined", info);
    }
    if (initiator) {
      link.attachLocalTracks(this.#tracks, this.#options.receive ?? {});
    }
    return link;
  }

  /** @internal Local tracks, for a link that answers its first offer. */
  _localTracks(): Map<MediaStreamTrack, MediaStream[]> {
    return this.#tracks;
  }

  #onSignal(frame: CallSignalEvent): void {
    if (frame.call_id !== this.callId || frame.to !== this.participantId) return;
    if (this.#state === "left" || this.#state === "ended") return;
    let link = this.#links.get(frame.from);
    if (!link) {
      const known = this.#known.get(frame.from);
      link = this.#link({ participantId: frame.from, userId: known?.userId ?? "", role: frame.role }, false);
    }
    link.onSignal(frame.signal);
  }

  #onJoined(e: ChannelEventOf<"call.participant_joined">): void {
    if (e.call_id !== this.callId || e.participant.participant_id === this.participantId) return;
    const id = e.participant.participant_id;
    const existing = this.#known.get(id);
    if (existing) {
      if (!existing.userId) existing.userId = e.participant.user_id;
      return;
    }
    // A later joiner: we are impolite towards them, and they offer to us.
    const info: CallPeerInfo = { participantId: id, userId: e.participant.user_id, role: "impolite" };
    this.#known.set(id, info);
    this.emit("peer.joined", info);
  }

  #onLeft(e: ChannelEventOf<"call.participant_left">): void {
    if (e.call_id !== this.callId) return;
    if (e.participant_id === this.participantId) {
      this.#finish("ended", e.reason);
      return;
    }
    const info = this.#known.get(e.participant_id) ?? {
      participantId: e.participant_id,
      userId: e.user_id,
      role: "impolite" as const,
    };
    this.#known.delete(e.participant_id);
    const link = this.#links.get(e.participant_id);
    this.#links.delete(e.participant_id);
    link?.close();
    this.emit("peer.left", { ...info, reason: e.reason });
  }

  #onConnection(change: ConnectionStateChange): void {
    if (this.#state === "left" || this.#state === "ended") return;
    if (change.current === "reconnecting" || change.current === "disconnected") {
      if (this.#state !== "reconnecting") {
        this.#state = "reconnecting";
        this.emit("statechange", { state: "reconnecting", reason: change.reason ?? "connection lost" });
      }
      return;
    }
    if (change.current === "connected" && this.#state === "reconnecting") {
      void this.#reattach();
    }
  }

  /** Back on a new connection: attach again, then restart ICE with everyone (the network may differ). */
  async #reattach(): Promise<void> {
    try {
      await this._attach();
    } catch (e) {
      const error = e instanceof ParleyError ? e : new ParleyError({ code: "internal", message: String(e) });
      if (error.code === "disconnected" || error.code === "timeout") return; // the next `connected` retries
      this.emit("error", error);
      this.#finish("ended", "timeout");
      return;
    }
    this.#state = "active";
    this.emit("statechange", { state: "active", reason: "reattached" });
    for (const link of this.#links.values()) link.restartIce();
  }

  #finish(state: "left" | "ended", reason?: CallEvents["ended"]["reason"]): void {
    if (this.#state === "left" || this.#state === "ended") return;
    this.#state = state;
    for (const off of this.#offs.splice(0)) off();
    for (const link of this.#links.values()) link.close();
    this.#links.clear();
    this.emit("statechange", { state });
    this.emit("ended", { reason: reason ?? "left" });
  }
}

/** One RTCPeerConnection and its perfect-negotiation state. */
class PeerLink {
  readonly info: CallPeerInfo;
  readonly pc: RTCPeerConnection;
  readonly #call: CallSession;
  #makingOffer = false;
  #ignoreOffer = false;
  #settingRemoteAnswer = false;
  /** The next offer must restart ICE (the server requires it after a reconnect). */
  #restartPending = false;
  #localUfrag: string | undefined;
  #tracksAttached = false;
  #closed = false;
  /** Incoming signals are applied one at a time, in order. */
  #queue: Promise<void> = Promise.resolve();

  constructor(call: CallSession, info: CallPeerInfo, pc: RTCPeerConnection) {
    this.#call = call;
    this.info = info;
    this.pc = pc;
    pc.onnegotiationneeded = () => void this.#negotiate();
    pc.onicecandidate = (event) => {
      if (this.#closed) return;
      this.#send(candidateToWire(event.candidate));
    };
    pc.ontrack = (event) => {
      this.#call._emit("track", { ...this.info, track: event.track, streams: event.streams });
    };
    pc.oniceconnectionstatechange = () => {
      if (pc.iceConnectionState === "failed") this.restartIce();
    };
    pc.onconnectionstatechange = () => {
      this.#call._emit("peer.connectionstatechange", { ...this.info, state: pc.connectionState });
    };
  }

  get #polite(): boolean {
    return this.info.role === "polite";
  }

  /** For the side that offers first: local tracks, and receive-only transceivers for the rest. */
  attachLocalTracks(tracks: Map<MediaStreamTrack, MediaStream[]>, receive: { audio?: boolean; video?: boolean }): void {
    this.#tracksAttached = true;
    const kinds = new Set<string>();
    for (const [track, streams] of tracks) {
      this.pc.addTrack(track, ...streams);
      kinds.add(track.kind);
    }
    for (const kind of ["audio", "video"] as const) {
      if (!kinds.has(kind) && receive[kind] !== false) this.pc.addTransceiver(kind, { direction: "recvonly" });
    }
  }

  addTrack(track: MediaStreamTrack, streams: MediaStream[]): void {
    if (this.#closed) return;
    // Reuse a transceiver of that kind that sends nothing (a receive-only one), else add one.
    const idle = this.pc
      .getTransceivers()
      .find((t) => t.sender.track === null && t.receiver.track.kind === track.kind && t.currentDirection !== "stopped");
    if (idle) {
      void idle.sender.replaceTrack(track);
      idle.sender.setStreams?.(...streams);
      idle.direction = idle.direction === "recvonly" || idle.direction === "inactive" ? "sendrecv" : idle.direction;
    } else {
      this.pc.addTrack(track, ...streams);
    }
  }

  removeTrack(track: MediaStreamTrack): void {
    if (this.#closed) return;
    const sender = this.pc.getSenders().find((s) => s.track === track);
    if (sender) this.pc.removeTrack(sender);
  }

  async replaceTrack(previous: MediaStreamTrack, next: MediaStreamTrack | null): Promise<void> {
    if (this.#closed) return;
    const sender = this.pc.getSenders().find((s) => s.track === previous);
    if (sender) await sender.replaceTrack(next);
  }

  restartIce(): void {
    if (this.#closed) return;
    this.#restartPending = true;
    this.pc.restartIce();
  }

  /** The peer reconnected: whichever side offers next must restart ICE. */
  expectIceRestart(): void {
    this.#restartPending = true;
  }

  onSignal(signal: SignalPayload): void {
    this.#queue = this.#queue.then(() => this.#apply(signal)).catch((e: unknown) => this.#fail("applying a signal", e));
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.pc.onnegotiationneeded = null;
    this.pc.onicecandidate = null;
    this.pc.ontrack = null;
    this.pc.oniceconnectionstatechange = null;
    this.pc.onconnectionstatechange = null;
    this.pc.close();
  }

  async #negotiate(): Promise<void> {
    if (this.#closed) return;
    try {
      this.#makingOffer = true;
      if (this.#restartPending) this.pc.restartIce();
      await this.pc.setLocalDescription();
      const local = this.pc.localDescription;
      if (this.#closed || !local || local.type !== "offer") return;
      const iceRestart = this.#restartPending || isIceRestart(this.#localUfrag, local.sdp);
      this.#restartPending = false;
      this.#localUfrag = iceUfrag(local.sdp);
      this.#send({ kind: "offer", sdp: local.sdp, ice_restart: iceRestart });
    } catch (e) {
      this.#fail("making an offer", e);
    } finally {
      this.#makingOffer = false;
    }
  }

  async #apply(signal: SignalPayload): Promise<void> {
    if (this.#closed) return;
    switch (signal.kind) {
      case "offer":
      case "answer": {
        const decision = decideRemoteDescription(signal.kind, {
          polite: this.#polite,
          makingOffer: this.#makingOffer,
          signalingState: this.pc.signalingState as SignalingStateLike,
          settingRemoteAnswer: this.#settingRemoteAnswer,
        });
        this.#ignoreOffer = decision.ignore;
        if (decision.ignore) return;
        this.#settingRemoteAnswer = signal.kind === "answer";
        try {
          await this.pc.setRemoteDescription({ type: signal.kind, sdp: signal.sdp ?? "" });
        } finally {
          this.#settingRemoteAnswer = false;
        }
        if (signal.kind === "offer") {
          if (!this.#tracksAttached) {
            // First offer from this peer: send our tracks on the transceivers it created.
            this.#tracksAttached = true;
            for (const [track, streams] of this.#call._localTracks()) this.addTrack(track, streams);
          }
          if (signal.ice_restart) this.#restartPending = false;
          await this.pc.setLocalDescription();
          const local = this.pc.localDescription;
          if (this.#closed || !local) return;
          this.#localUfrag = iceUfrag(local.sdp);
          this.#send({ kind: "answer", sdp: local.sdp });
        }
        return;
      }
      case "candidate":
        try {
          await this.pc.addIceCandidate(candidateFromWire(signal.candidate ?? ""));
        } catch (e) {
          if (!this.#ignoreOffer) throw e;
        }
        return;
      case "end_of_candidates":
        try {
          await this.pc.addIceCandidate();
        } catch {
          /* not every implementation accepts it; candidates gathered so far are enough */
        }
        return;
      case "rollback":
        if (this.pc.signalingState === "have-remote-offer") {
          await this.pc.setRemoteDescription({ type: "rollback" });
        }
        return;
    }
  }

  #send(signal: SignalPayload): void {
    if (this.#closed) return;
    this.#call._signal(this.info.participantId, signal).then(
      () => {},
      (e: unknown) => {
        if (e instanceof ParleyError && e.code === "conflict" && needsIceRestart(e.reason)) {
          this.restartIce();
          return;
        }
        // A signal lost with the connection is repaired by the ICE restart after the reconnect.
        if (e instanceof ParleyError && (e.code === "disconnected" || e.code === "closed")) return;
        // Trickle refused around a glare or a peer who left: harmless, the next offer carries all.
        if (signal.kind === "candidate" || signal.kind === "end_of_candidates") return;
        this.#fail(`sending ${signal.kind}`, e);
      },
    );
  }

  #fail(what: string, e: unknown): void {
    if (this.#closed) return;
    const error =
      e instanceof ParleyError
        ? e
        : new ParleyError({ code: "internal", message: `call ${this.info.participantId}: ${what}: ${String(e)}`, cause: e });
    this.#call._emit("error", error);
  }
}
