// The page side of calls_browser.test.ts: a person in a browser using the built SDK. The test
// drives it through `window.harness`. Plain JavaScript, served as is.
import * as parley from "/sdk.js";

// WebRTC stays on loopback: candidates of other addresses are kept from the SDK (so they are
// never signalled) and taken out of local descriptions. Injected through the SDK's
// `RTCPeerConnection` option, the way an application would wrap it.
const isLoopback = (line) => line.replace(/^a=/, "").split(" ")[4] === "127.0.0.1";
class LoopbackPeerConnection extends RTCPeerConnection {
  #handler = null;
  constructor(configuration) {
    super(configuration);
    super.onicecandidate = (event) => {
      if (event.candidate && event.candidate.candidate && !isLoopback(event.candidate.candidate)) return;
      this.#handler?.call(this, event);
    };
  }
  get onicecandidate() {
    return this.#handler;
  }
  set onicecandidate(handler) {
    this.#handler = handler;
  }
  get localDescription() {
    const d = super.localDescription;
    if (!d) return d;
    const sdp = d.sdp.split("\r\n").filter((l) => !l.startsWith("a=candidate:") || isLoopback(l)).join("\r\n");
    return new RTCSessionDescription({ type: d.type, sdp });
  }
}

const log = [];
const state = {};

window.harness = {
  log,
  async start({ url, token, channelId, callId, sfu, tone, size }) {
    const client = new parley.ParleyClient({ url, token, backoff: { initialMs: 100, maxMs: 1000 } });
    state.client = client;
    client.connection.on("statechange", (c) => log.push(`conn:${c.current}`));
    await client.connect();
    let stream = await navigator.mediaDevices.getUserMedia({ video: { width: size?.width ?? 320, height: size?.height ?? 240 }, audio: true });
    if (tone) {
      // A steady 440 Hz tone instead of the fake microphone (which beeps 20 ms every 500 ms, too
      // quiet on average to count as speech): this person is the one speaking.
      const audio = new AudioContext();
      const oscillator = audio.createOscillator();
      const gain = audio.createGain();
      gain.gain.value = 0.5;
      const destination = audio.createMediaStreamDestination();
      oscillator.connect(gain).connect(destination);
      oscillator.start();
      await audio.resume();
      for (const t of stream.getAudioTracks()) t.stop();
      stream = new MediaStream([...stream.getVideoTracks(), ...destination.stream.getAudioTracks()]);
    }
    state.stream = stream;
    const options = { stream, RTCPeerConnection: LoopbackPeerConnection, ...(sfu ? { sfu } : {}) };
    const session = callId ? await client.joinCall(callId, options) : await client.startCall(channelId, options);
    state.session = session;
    session.on("peer.joined", (p) => log.push(`joined:${p.userId}:${p.role}`));
    session.on("peer.left", (p) => log.push(`left:${p.userId}:${p.reason}`));
    session.on("peer.reconnecting", (p) => log.push(`reconnecting:${p.userId}`));
    session.on("peer.reconnected", (p) => log.push(`reconnected:${p.userId}`));
    session.on("track", (e) => log.push(`track:${e.userId}:${e.track.kind}`));
    session.on("peer.connectionstatechange", (e) => log.push(`pc:${e.userId}:${e.state}`));
    session.on("statechange", (e) => log.push(`call:${e.state}`));
    session.on("error", (e) => log.push(`error:${e.code}:${e.message}`));
    session.on("ended", (e) => log.push(`ended:${e.reason}`));
    session.on("mode", (e) => log.push(`mode:${e.mode}`));
    session.on("track.removed", (e) => log.push(`track.removed:${e.userId}:${e.track.kind}`));
    session.on("active_speaker", (e) => log.push(`speaker:${e.userId}`));
    session.on("sfu.connectionstatechange", (e) => log.push(`sfu:${e.state}`));
    if (session.mode === "sfu") log.push("mode:sfu");
    return { callId: session.callId, participantId: session.participantId };
  },
  /** Video frames decoded from every peer (inbound-rtp, video), via the SDK's per-peer RTCPeerConnection. */
  async framesDecoded() {
    let frames = 0;
    for (const peer of state.session.peers()) {
      const pc = state.session.peerConnection(peer.participantId);
      if (!pc) continue;
      (await pc.getStats()).forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded ?? 0;
      });
    }
    return frames;
  },
  /** Video frames decoded per peer, by user id. */
  async framesPerPeer() {
    const out = {};
    for (const peer of state.session.peers()) {
      const pc = state.session.peerConnection(peer.participantId);
      let frames = 0;
      if (pc) {
        (await pc.getStats()).forEach((s) => {
          if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded ?? 0;
        });
      }
      out[peer.userId] = frames;
    }
    return out;
  },
  mode() {
    return state.session.mode;
  },
  /** SFU mode: video frames decoded per remote user, over the one connection to the SFU (by the slot's bound track). */
  async sfuFramesPerPeer() {
    const out = {};
    const pc = state.session.sfuConnection();
    if (!pc) return out;
    const byMid = new Map();
    const users = new Map(state.session.peers().map((p) => [p.participantId, p.userId]));
    for (const t of state.session.remoteTracks()) if (t.mid !== undefined) byMid.set(t.mid, users.get(t.participantId) ?? t.participantId);
    (await pc.getStats()).forEach((s) => {
      if (s.type !== "inbound-rtp" || s.kind !== "video") return;
      const who = byMid.get(s.mid);
      if (who) out[who] = (out[who] ?? 0) + (s.framesDecoded ?? 0);
    });
    return out;
  },
  /** SFU mode: how many simulcast encodings the camera track is sent with, and their rids. */
  sfuSendRids() {
    const pc = state.session.sfuConnection();
    const sender = pc?.getSenders().find((s) => s.track?.kind === "video");
    return (sender?.getParameters().encodings ?? []).map((e) => e.rid ?? "");
  },
  /** SFU mode: receive slots (recvonly transceivers) per kind. */
  sfuSlots() {
    const out = { audio: 0, video: 0 };
    for (const t of state.session.sfuConnection()?.getTransceivers() ?? []) {
      if (t.direction === "recvonly") out[t.receiver.track.kind] += 1;
    }
    return out;
  },
  /** P2P connections still open. */
  openP2P() {
    return state.session.peers().filter((p) => {
      const pc = state.session.peerConnection(p.participantId);
      return pc && pc.connectionState !== "closed";
    }).length;
  },
  /** SFU mode: the published tracks, as `user:kind:subscribed:mid`. */
  remoteTracks() {
    const users = new Map(state.session.peers().map((p) => [p.participantId, p.userId]));
    return state.session.remoteTracks().map((t) => `${users.get(t.participantId) ?? t.participantId}:${t.kind}:${t.subscribed}:${t.mid ?? "-"}`);
  },
  trackIdOf({ user, kind }) {
    const ids = new Map(state.session.peers().map((p) => [p.userId, p.participantId]));
    return state.session.remoteTracks().find((t) => t.participantId === ids.get(user) && t.kind === kind)?.trackId;
  },
  async unsubscribe({ user, kind }) {
    await state.session.unsubscribe(window.harness.trackIdOf({ user, kind }));
  },
  async subscribe({ user, kind }) {
    await state.session.subscribe(window.harness.trackIdOf({ user, kind }));
  },
  async setVideo({ user, prefs }) {
    await state.session.setVideo(window.harness.trackIdOf({ user, kind: "video" }), prefs);
  },
  /** SFU mode: what this page sends of its camera, per rid (`rid:WxH:frames:limitation`). */
  async sentLayers() {
    const out = [];
    (await state.session.sfuConnection().getStats()).forEach((s) => {
      if (s.type === "outbound-rtp" && s.kind === "video") out.push(`${s.rid}:${s.frameWidth}x${s.frameHeight}:${s.framesEncoded}:${s.qualityLimitationReason}:${s.active}`);
    });
    return out.sort();
  },
  /** SFU mode: the simulcast layer the SFU says it sends of a user's video (`null`: none, `undefined`: not said). */
  layerOf({ user }) {
    const ids = new Map(state.session.peers().map((p) => [p.userId, p.participantId]));
    return state.session.remoteTracks().find((t) => t.participantId === ids.get(user) && t.kind === "video")?.layer;
  },
  activeSpeaker() {
    const id = state.session.activeSpeaker;
    if (id === null) return null;
    if (id === state.session.participantId) return "me";
    return state.session.peers().find((p) => p.participantId === id)?.userId ?? id;
  },
  restartIce() {
    state.session.restartIce();
  },
  /** The local ICE ufrag towards each peer (changes with an ICE restart). */
  ufrags() {
    return state.session.peers().map((p) => parley.iceUfrag(state.session.peerConnection(p.participantId)?.localDescription?.sdp));
  },
  peers() {
    return state.session.peers().map((p) => `${p.userId}:${p.role}:${state.session.peerConnection(p.participantId)?.connectionState}`);
  },
  /** A second video track (a canvas), added to the call: renegotiation. */
  addCanvasTrack() {
    const canvas = document.createElement("canvas");
    canvas.width = 160;
    canvas.height = 120;
    const ctx = canvas.getContext("2d");
    let n = 0;
    setInterval(() => {
      ctx.fillStyle = `hsl(${(n += 10) % 360} 80% 50%)`;
      ctx.fillRect(0, 0, 160, 120);
    }, 50);
    const stream = canvas.captureStream(20);
    const [track] = stream.getVideoTracks();
    state.canvasTrack = track;
    state.session.addTrack(track, stream);
  },
  /** Swaps the camera's video track for a fresh canvas track (no renegotiation). */
  async replaceCamera() {
    const camera = state.stream.getVideoTracks()[0];
    const canvas = document.createElement("canvas");
    canvas.width = 160;
    canvas.height = 120;
    const ctx = canvas.getContext("2d");
    setInterval(() => {
      ctx.fillStyle = `hsl(${Date.now() % 360} 80% 50%)`;
      ctx.fillRect(0, 0, 160, 120);
    }, 50);
    const [track] = canvas.captureStream(20).getVideoTracks();
    await state.session.replaceTrack(camera, track);
    camera.stop();
    const sender = state.session.peers().map((p) => state.session.peerConnection(p.participantId).getSenders().find((s) => s.track === track));
    return sender.every(Boolean);
  },
  removeCanvasTrack() {
    state.session.removeTrack(state.canvasTrack);
  },
  reconnect() {
    state.client.reconnectNow();
  },
  async leave() {
    await state.session.leave();
  },
  close() {
    state.client?.close();
  },
};
document.title = "ready";
