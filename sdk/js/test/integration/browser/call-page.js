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
  async start({ url, token, channelId, callId }) {
    const client = new parley.ParleyClient({ url, token, backoff: { initialMs: 100, maxMs: 1000 } });
    state.client = client;
    client.connection.on("statechange", (c) => log.push(`conn:${c.current}`));
    await client.connect();
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 240 }, audio: true });
    state.stream = stream;
    const options = { stream, RTCPeerConnection: LoopbackPeerConnection };
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
