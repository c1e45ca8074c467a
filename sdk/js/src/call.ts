//! Calls: `CallSession` owns one RTCPeerConnection per remote participant (P2P mesh) and runs
//! perfect negotiation on each through Parley's signaling relay, with the role the server
//! assigned to the pair. It trickles ICE, renegotiates when tracks change, restarts ICE after a
//! network failure or a reconnect of the realtime client (re-attaching first), and reports
//! participants and remote tracks as events.
//!
//! It never decides roles itself (the server does) and never looks inside SDP except for the ICE
//! ufrag, to tell the server whether an offer restarts ICE.
//!
//! In SFU mode (the call's `mode` is `sfu` from the start, or becomes `sfu` when the server
//! escalates it) the session holds one connection to the SFU instead (`call_sfu.ts`), moves its
//! media there by itself, and closes the P2P connections once the SFU connection is up.
import { SfuLink, type SfuBinding, type SfuOptions } from "./call_sfu.js";
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
  CallMode,
  CallSfuEvent,
  SfuJoin,
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
  /** SFU mode: simulcast and receive slots (see `SfuOptions`). */
  sfu?: SfuOptions;
}




/** A track published in an SFU call, as the SFU announced it. */
export interface RemoteTrackInfo {
  /** The SFU's id of the track (for `subscribe`, `unsubscribe`, `setVideo`). */
  trackId: string;
  participantId: string;
  kind: "audio" | "video";
  /** This client asked for it (or was subscribed automatically) and has not unsubscribed. */
  subscribed: boolean;
  /** The receive slot it arrives on, while bound. */
  mid?: string;
  /** The simulcast layer the SFU last said it sends (`null`: no video now). */
  layer?: string | null;
}

/** What a subscriber wants of a video track (SFU mode). */
export interface VideoPreferences {
  /** No video of the track until resumed (audio is not affected). */
  paused?: boolean;
  /** The largest frame size wanted, e.g. the tile size on screen; the SFU picks the layer. */
  maxSize?: { width: number; height: number };
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
  /**
   * A remote track arrived. In SFU mode `streams[0]` is the participant's stream (its bound
   * tracks), and a slot that is re-bound to another track reports that track anew.
   */
  track: CallPeerInfo & { track: MediaStreamTrack; streams: readonly MediaStream[] };
  /** SFU mode: a remote track stopped arriving (unsubscribed, unpublished, or its publisher left). */
  "track.removed": CallPeerInfo & { track: MediaStreamTrack; streams: readonly MediaStream[] };
  /** The call's mode changed (`sfu` after an escalation): the session moves its media itself. */
  mode: { mode: CallMode };
  /** SFU mode: the connection to the SFU changed its `connectionState`. */
  "sfu.connectionstatechange": { state: RTCPeerConnectionState };
  /** SFU mode: the tracks published in the call changed (see `remoteTracks()`). */
  "tracks.changed": { tracks: RemoteTrackInfo[] };
  /** SFU mode: the simulcast layer the SFU sends you of a video track changed (`null`: no video now). */
  "track.layer": { trackId: string; participantId: string; layer: string | null };
  /** SFU mode: the loudest participant (`null`: nobody speaks). */
  "active_speaker": { participantId: string | null; userId: string | null };
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
  #mode: CallMode;
  /** The connection to the SFU (SFU mode). */
  #sfu: SfuLink | undefined;
  /** The SFU assignment the session is moving to, or is on. */
  #sfuSession: string | undefined;
  /** The SFU assignment `#sfu` belongs to. */
  #sfuLinkSession: string | undefined;
  /** The credential of the last join answer in SFU mode. */
  #sfuJoin: SfuJoin | undefined;
  /** A connection to the SFU is being set up (a join for the credential may be under way). */
  #sfuStarting = false;
  /** Re-joins for a fresh credential in a row without the SFU connection coming up. */
  #sfuRetries = 0;
  /** Tracks published in the call (SFU mode), by track id. */
  readonly #remoteTracks = new Map<string, RemoteTrackInfo>();
  #activeSpeaker: string | null = null;

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
    this.#mode = joined.call.mode;
    this.#sfuJoin = joined.sfu ?? undefined;
    for (const track of options.stream?.getTracks() ?? []) this.#tracks.set(track, [options.stream as MediaStream]);
  }

  get state(): CallState {
    return this.#state;
  }

  /** How media flows: `p2p` (a mesh) or `sfu`. Changes by itself when the server escalates. */
  get mode(): CallMode {
    return this.#mode;
  }

  /** The participant the SFU announced as speaking (SFU mode), or `null`. */
  get activeSpeaker(): string | null {
    return this.#activeSpeaker;
  }

  /** The other participants: those you have a connection to (P2P), or everyone present (SFU). */
  peers(): CallPeerInfo[] {
    if (this.#mode === "sfu") return [...this.#known.values()];
    return [...this.#links.values()].map((l) => l.info);
  }

  /** The RTCPeerConnection to the SFU (SFU mode), e.g. for `getStats()`. */
  sfuConnection(): RTCPeerConnection | undefined {
    return this.#sfu?.pc;
  }

  /** SFU mode: the tracks the others publish, and which of them you receive. */
  remoteTracks(): RemoteTrackInfo[] {
    return [...this.#remoteTracks.values()].map((t) => ({ ...t }));
  }

  /**
   * SFU mode: receive a track (everyone is subscribed to everything by default). For video,
   * `prefs` set pause and size at once.
   */
  async subscribe(trackId: string, prefs: VideoPreferences = {}): Promise<void> {
    await this.#sfuOp("subscribe", trackId, prefs);
    const t = this.#remoteTracks.get(trackId);
    if (t) t.subscribed = true;
  }

  /** SFU mode: stop receiving a track (its slot is freed for another). */
  async unsubscribe(trackId: string): Promise<void> {
    await this.#sfuOp("unsubscribe", trackId, {});
    const t = this.#remoteTracks.get(trackId);
    if (t) t.subscribed = false;
  }

  /**
   * SFU mode: pause or resume a subscribed video track (audio is not affected), or set the
   * largest size you want of it (the tile size): the SFU sends the smallest simulcast layer at
   * least that large, within your bandwidth.
   */
  async setVideo(trackId: string, prefs: VideoPreferences): Promise<void> {
    await this.#sfuOp("video", trackId, prefs);
  }

  /** SFU mode: shorthand for `setVideo(trackId, { paused: true })`. */
  pauseVideo(trackId: string): Promise<void> {
    return this.setVideo(trackId, { paused: true });
  }

  /** SFU mode: shorthand for `setVideo(trackId, { paused: false })`. */
  resumeVideo(trackId: string): Promise<void> {
    return this.setVideo(trackId, { paused: false });
  }

  /** The RTCPeerConnection to one peer (e.g. for `getStats()`), if there is one. */
  peerConnection(participantId: string): RTCPeerConnection | undefined {
    return this.#links.get(participantId)?.pc;
  }

  /** Sends a track to every peer (and to peers who join later); renegotiates. */
  addTrack(track: MediaStreamTrack, ...streams: MediaStream[]): void {
    this.#tracks.set(track, streams);
    for (const link of this.#links.values()) link.addTrack(track, streams);
    this.#sfu?.addTrack(track, streams);
  }

  /** Stops sending a track to every peer; renegotiates. The track itself is not stopped. */
  removeTrack(track: MediaStreamTrack): void {
    this.#tracks.delete(track);
    for (const link of this.#links.values()) link.removeTrack(track);
    this.#sfu?.removeTrack(track);
  }

  /**
   * Sends `next` instead of `previous` to every peer without renegotiating (switching camera,
   * muting by sending `null`). `previous` must be a track given to `addTrack` or in `stream`.
   */
  async replaceTrack(previous: MediaStreamTrack, next: MediaStreamTrack | null): Promise<void> {
    const streams = this.#tracks.get(previous) ?? [];
    this.#tracks.delete(previous);
    if (next) this.#tracks.set(next, streams);
    await Promise.all([
      ...[...this.#links.values()].map((link) => link.replaceTrack(previous, next)),
      this.#sfu?.replaceTrack(previous, next),
    ]);
  }

  /** Restarts ICE with every peer (also done on its own after a failure or a reconnect). */
  restartIce(): void {
    for (const link of this.#links.values()) link.restartIce();
    // The SFU connection needs no ICE restart for a WebSocket reconnect (docs/calls.md): its
    // media path did not change. ICE failures restart it on their own.
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
      c.on("call.mode_changed", (e) => {
        if (e.call_id === this.callId) this.#onMode(e.mode, e.sfu_session ?? undefined);
      }),
      c.on("call.sfu", (e) => {
        if (e.call_id === this.callId) this.#onSfuNotice(e);
      }),
      c.on("call.active_speaker", (e) => {
        if (e.call_id === this.callId) this.#onActiveSpeaker(e.participant_id ?? null);
      }),
    );
    // Offer to everyone already there on the next task, so that listeners attached right after
    // `await joinCall(...)` see their `peer.joined` and every later event.
    setTimeout(() => {
      if (this.#state === "left" || this.#state === "ended") return;
      for (const peer of joined.peers) {
        const info = { participantId: peer.participant_id, userId: peer.user_id, role: peer.role };
        if (this.#mode === "sfu") {
          if (!this.#known.has(info.participantId)) {
            this.#known.set(info.participantId, info);
            this.emit("peer.joined", info);
          }
        } else {
          this.#link(info, true);
        }
      }
      if (this.#mode === "sfu") void this.#startSfu(joined.call.sfu_session ?? this.#sfuJoin?.session, false);
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
    link = new PeerLink(this, info, new this.#PC(this.#rtcConfiguration()));
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
    if (frame.from === SFU_PEER) {
      this.#onSfuSignal(frame.signal);
      return;
    }
    let link = this.#links.get(frame.from);
    if (!link) {
      // In SFU mode nobody needs a new P2P connection (a late P2P offer from a participant who
      // has not escalated yet goes unanswered; it escalates too).
      if (this.#mode === "sfu") return;
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
    // The SFU connection needs no ICE restart for a WebSocket reconnect (docs/calls.md): its
    // media path did not change. ICE failures restart it on their own.
  }

  // ---- SFU mode ----

  async #sfuOp(op: "subscribe" | "unsubscribe" | "video", trackId: string, prefs: VideoPreferences): Promise<void> {
    if (this.#mode !== "sfu") {
      throw new ParleyError({ code: "conflict", message: `${op}: the call is not in SFU mode (mode ${this.#mode})` });
    }
    await this.#client.request({
      type: "call.sfu",
      call_id: this.callId,
      participant_id: this.participantId,
      op,
      track_id: trackId,
      ...(prefs.paused !== undefined ? { paused: prefs.paused } : {}),
      ...(prefs.maxSize ? { max_width: prefs.maxSize.width, max_height: prefs.maxSize.height } : {}),
    });
  }

  /** The server changed the call's mode (escalation, or a move to another SFU). */
  #onMode(mode: CallMode, session: string | undefined): void {
    if (this.#state === "left" || this.#state === "ended") return;
    const changed = mode !== this.#mode;
    this.#mode = mode;
    if (changed) this.emit("mode", { mode });
    if (mode === "sfu") void this.#startSfu(session, false);
  }

  /**
   * Opens a connection to the SFU of `session`: publishes the local tracks there and opens
   * receive slots for everyone present. A previous SFU connection (another session) is closed;
   * the P2P connections stay until the SFU connection is up, so media keeps flowing during the
   * move. Joins again first when the credential at hand is for another session or expired.
   */
  async #startSfu(session: string | undefined, force: boolean): Promise<void> {
    if (this.#state === "left" || this.#state === "ended") return;
    // One connection per session: the join answer and a `call.mode_changed` may both ask.
    if (!force && ((this.#sfuStarting && session === this.#sfuSession) || (this.#sfu && session === this.#sfuLinkSession))) return;
    this.#sfuSession = session;
    this.#sfuStarting = true;
    try {
      await this.#connectSfu(session);
    } finally {
      this.#sfuStarting = false;
    }
  }

  async #connectSfu(session: string | undefined): Promise<void> {
    let credential = this.#sfuJoin;
    const fresh = (j: SfuJoin | undefined) =>
      j !== undefined && (session === undefined || j.session === session) && j.expires_at * 1000 > Date.now() + 5_000;
    if (!fresh(credential)) {
      try {
        const joined = await this.#client.rest.joinCall(this.callId);
        this.#sfuJoin = joined.sfu ?? undefined;
        credential = this.#sfuJoin;
        if (joined.call.sfu_session) this.#sfuSession = joined.call.sfu_session;
      } catch (e) {
        this.emit("error", toParleyError("joining again for the SFU credential", e));
        return;
      }
      if (this.#over()) return;
      if (!credential) {
        this.emit("error", new ParleyError({ code: "internal", message: "call (SFU): the join answer has no SFU credential" }));
        return;
      }
    }
    this.#openSfu(credential as SfuJoin);
  }

  #openSfu(credential: SfuJoin): void {
    this.#sfuLinkSession = credential.session;
    this.#sfu?.close();
    this.#dropSfuState();
    const others = Math.max(1, this.#known.size);
    const slots = this.#options.sfu?.slots ?? {};
    const receive = this.#options.receive ?? {};
    const link: SfuLink = new SfuLink(
      new this.#PC(this.#rtcConfiguration()),
      {
        signal: async (signal) => {
          await this._signal(SFU_PEER, signal);
        },
        onTrack: (binding, track, stream) => {
          this.#setBinding(binding, track.kind);
          this.emit("track", { ...this.#infoOf(binding.publisher), track, streams: [stream] });
        },
        onTrackRemoved: (binding, track, stream) => {
          const t = this.#remoteTracks.get(binding.track);
          if (t) delete t.mid;
          this.emit("track.removed", { ...this.#infoOf(binding.publisher), track, streams: [stream] });
        },
        onConnectionState: (state) => {
          if (this.#sfu !== link) return;
          this.emit("sfu.connectionstatechange", { state });
          if (state === "connected") {
            this.#sfuRetries = 0;
            // The media flows through the SFU now: the mesh is no longer needed.
            this.#closeP2P();
          }
        },
        onError: (what, e) => {
          if (this.#sfu !== link) return;
          const error = toParleyError(`call (SFU): ${what}`, e);
          // A refused credential (expired, or for a session that moved): join again, once in a row.
          if (error.code === "forbidden" && error.reason?.startsWith("credential") && this.#sfuRetries < 1) {
            this.#sfuRetries += 1;
            this.#sfuJoin = undefined;
            void this.#startSfu(this.#sfuSession, true);
            return;
          }
          this.emit("error", error);
        },
      },
      credential.credential,
      this.#options.sfu,
    );
    this.#sfu = link;
    link.start(this.#tracks, {
      audio: receive.audio === false ? 0 : (slots.audio ?? others),
      video: receive.video === false ? 0 : (slots.video ?? others),
    });
  }

  /** Bindings and track ids belong to one SFU session. */
  #dropSfuState(): void {
    if (this.#remoteTracks.size > 0) {
      this.#remoteTracks.clear();
      this.emit("tracks.changed", { tracks: [] });
    }
  }

  #closeP2P(): void {
    for (const link of this.#links.values()) link.close();
    this.#links.clear();
  }

  #onSfuSignal(signal: SignalPayload): void {
    const link = this.#sfu;
    if (!link) return;
    switch (signal.kind) {
      case "answer":
        void link.onAnswer(signal.sdp ?? "");
        return;
      case "candidate":
        void link.onCandidate(signal.candidate ?? "");
        return;
      default:
        return; // the SFU never offers
    }
  }

  #onSfuNotice(e: CallSfuEvent): void {
    if (e.participant_id !== this.participantId) return;
    const link = this.#sfu;
    switch (e.event) {
      case "track_published": {
        if (e.publisher === this.participantId) return;
        const existing = this.#remoteTracks.get(e.track_id);
        this.#remoteTracks.set(e.track_id, {
          trackId: e.track_id,
          participantId: e.publisher,
          kind: e.kind,
          subscribed: existing?.subscribed ?? true,
          ...(existing?.mid ? { mid: existing.mid } : {}),
        });
        this.emit("tracks.changed", { tracks: this.remoteTracks() });
        return;
      }
      case "track_unpublished":
        if (this.#remoteTracks.delete(e.track_id)) this.emit("tracks.changed", { tracks: this.remoteTracks() });
        return;
      case "bound":
        link?.bind({ track: e.track_id, publisher: e.publisher, mid: e.mid });
        return;
      case "unbound":
        link?.unbind(e.track_id, e.mid);
        return;
      case "renegotiate":
        link?.addSlots(e.audio, e.video);
        link?.negotiate();
        return;
      case "layer": {
        const t = this.#remoteTracks.get(e.track_id);
        const layer = e.layer ?? null;
        if (t) t.layer = layer;
        this.emit("track.layer", { trackId: e.track_id, participantId: t?.participantId ?? "", layer });
        return;
      }
      case "connected":
        return;
      case "disconnected":
        // The SFU dropped this connection: a new one, with a credential (joining again if needed).
        if (link) void this.#startSfu(this.#sfuSession, true);
        return;
    }
  }

  #setBinding(binding: SfuBinding, kind: string): void {
    const t = this.#remoteTracks.get(binding.track);
    if (t) {
      t.mid = binding.mid;
      return;
    }
    this.#remoteTracks.set(binding.track, {
      trackId: binding.track,
      participantId: binding.publisher,
      kind: kind === "audio" ? "audio" : "video",
      subscribed: true,
      mid: binding.mid,
    });
  }

  #onActiveSpeaker(participantId: string | null): void {
    if (participantId === this.#activeSpeaker) return;
    this.#activeSpeaker = participantId;
    const userId =
      participantId === null
        ? null
        : participantId === this.participantId
          ? (this.#client.connection.welcome?.user_id ?? null)
          : (this.#known.get(participantId)?.userId ?? null);
    this.emit("active_speaker", { participantId, userId });
  }

  #infoOf(participantId: string): CallPeerInfo {
    return this.#known.get(participantId) ?? { participantId, userId: "", role: "impolite" };
  }

  #rtcConfiguration(): RTCConfiguration {
    return {
      iceServers: this.iceServers.map((s) => ({
        urls: s.urls,
        ...(s.username ? { username: s.username } : {}),
        ...(s.credential ? { credential: s.credential } : {}),
      })),
      ...this.#options.rtcConfiguration,
      bundlePolicy: "max-bundle",
    };
  }

  #over(): boolean {
    return this.#state === "left" || this.#state === "ended";
  }

  #finish(state: "left" | "ended", reason?: CallEvents["ended"]["reason"]): void {
    if (this.#state === "left" || this.#state === "ended") return;
    this.#state = state;
    for (const off of this.#offs.splice(0)) off();
    for (const link of this.#links.values()) link.close();
    this.#links.clear();
    this.#sfu?.close();
    this.#sfu = undefined;
    this.emit("statechange", { state });
    this.emit("ended", { reason: reason ?? "left" });
  }
}

/** The `to` / `from` of signals exchanged with the SFU. */
export const SFU_PEER = "sfu";

function toParleyError(what: string, e: unknown): ParleyError {
  return e instanceof ParleyError ? e : new ParleyError({ code: "internal", message: `${what}: ${String(e)}`, cause: e });
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
