//! A minimal page for the Go ↔ browser call test: joins a channel's call with the JS SDK, sends
//! the fake camera, and talks over a data channel labelled `chat`. The test drives it through
//! `window.callPeerTest`.
import { joinCall, ParleyClient, type CallSession } from "@parley/sdk";

interface State {
  session: CallSession | null;
  channel: RTCDataChannel | null;
  received: string[];
  events: string[];
}

const state: State = { session: null, channel: null, received: [], events: [] };

function note(line: string): void {
  state.events.push(line);
  const li = document.createElement("li");
  li.textContent = line;
  document.getElementById("log")?.append(li);
}

/** A steady 440 Hz tone as a microphone track (loud enough to be the SFU's active speaker). */
async function toneTrack(): Promise<MediaStreamTrack> {
  const audio = new AudioContext();
  const oscillator = audio.createOscillator();
  const gain = audio.createGain();
  gain.gain.value = 0.5;
  const destination = audio.createMediaStreamDestination();
  oscillator.connect(gain).connect(destination);
  oscillator.start();
  await audio.resume();
  return destination.stream.getAudioTracks()[0]!;
}

async function join(token: string, channelId: string, tone = false): Promise<{ participantId: string; others: number }> {
  const client = new ParleyClient({ url: location.origin, token });
  client.connection.on("statechange", (c) => note(`connection ${c.current}`));
  await client.connect();
  const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  if (tone) stream.addTrack(await toneTrack());
  const video = document.getElementById("local") as HTMLVideoElement;
  video.srcObject = stream;
  const call = await client.rest.startCall(channelId);
  const session = await joinCall(client, call.id, { stream });
  state.session = session;
  session.on("peer.connectionstatechange", (e) => note(`peer ${e.userId} ${e.state}`));
  session.on("track", (e) => {
    note(`track ${e.track.kind} from ${e.userId}`);
    if (e.track.kind === "video") (document.getElementById("remote") as HTMLVideoElement).srcObject = e.streams[0] ?? new MediaStream([e.track]);
  });
  session.on("error", (e) => note(`error ${e.code}: ${e.message}`));
  session.on("mode", (e) => note(`mode ${e.mode}`));
  const present = (await client.rest.getCall(call.id)).participants.filter((p) => !p.left_at);
  note(`joined ${call.id} as ${session.participantId}`);
  return { participantId: session.participantId, others: present.filter((p) => p.participant_id !== session.participantId).length };
}

/** Opens the `chat` data channel to the first peer and listens on every data channel. */
async function openChat(): Promise<void> {
  const session = state.session;
  if (!session) throw new Error("not in a call");
  // The SDK links the peers found at join on the next task: wait (bounded) for the connection.
  const deadline = Date.now() + 10_000;
  let pc: RTCPeerConnection | undefined;
  while (!pc) {
    const peer = session.peers()[0];
    pc = peer ? session.peerConnection(peer.participantId) : undefined;
    if (pc) break;
    if (Date.now() > deadline) throw new Error("no peer connection 10 s after joining");
    await new Promise((r) => setTimeout(r, 50));
  }
  const listen = (dc: RTCDataChannel) => {
    dc.addEventListener("open", () => note(`datachannel ${dc.label} open`));
    dc.addEventListener("message", (ev: MessageEvent) => {
      const text = typeof ev.data === "string" ? ev.data : new TextDecoder().decode(ev.data as ArrayBuffer);
      state.received.push(text);
      note(`datachannel ${dc.label} message ${text}`);
    });
  };
  pc.addEventListener("datachannel", (ev) => listen(ev.channel));
  const dc = pc.createDataChannel("chat");
  listen(dc);
  state.channel = dc;
}

/** The call's mode (`sfu` once escalated). */
function mode(): string {
  return state.session?.mode ?? "none";
}

/**
 * RTP packets received through the SFU, per publisher (participant id) and kind, from the SFU
 * connection's `inbound-rtp` stats and the slot bindings (`remoteTracks()[].mid`).
 */
async function sfuPackets(): Promise<Record<string, { audio: number; video: number }>> {
  const session = state.session;
  const pc = session?.sfuConnection();
  const out: Record<string, { audio: number; video: number }> = {};
  if (!session || !pc) return out;
  const byMid = new Map(session.remoteTracks().filter((t) => t.mid !== undefined).map((t) => [t.mid, t.participantId]));
  (await pc.getStats()).forEach((s: { type: string; kind?: string; mid?: string; packetsReceived?: number }) => {
    if (s.type !== "inbound-rtp" || (s.kind !== "audio" && s.kind !== "video")) return;
    const who = byMid.get(s.mid);
    if (!who) return;
    const entry = (out[who] ??= { audio: 0, video: 0 });
    entry[s.kind] += s.packetsReceived ?? 0;
  });
  return out;
}

function send(text: string): boolean {
  if (state.channel?.readyState !== "open") return false;
  state.channel.send(text);
  return true;
}

declare global {
  interface Window {
    callPeerTest: {
      join: typeof join;
      openChat: typeof openChat;
      send: typeof send;
      mode: typeof mode;
      sfuPackets: typeof sfuPackets;
      state: State;
    };
  }
}

window.callPeerTest = { join, openChat, send, mode, sfuPackets, state };
