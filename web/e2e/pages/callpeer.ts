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

async function join(token: string, channelId: string): Promise<{ participantId: string; peers: number }> {
  const client = new ParleyClient({ url: location.origin, token });
  client.connection.on("statechange", (c) => note(`connection ${c.current}`));
  await client.connect();
  const stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
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
  const current = await client.rest.getCall(call.id);
  note(`joined ${call.id} as ${session.participantId}; participants ${current.participants.map((p) => `${p.user_id}:${p.participant_id}${p.left_at ? " (left)" : ""}`).join(", ")}`);
  return { participantId: session.participantId, peers: session.peers().length };
}

/** Opens the `chat` data channel to the first peer and listens on every data channel. */
function openChat(): void {
  const session = state.session;
  const peer = session?.peers()[0];
  const pc = peer ? session?.peerConnection(peer.participantId) : undefined;
  if (!pc) throw new Error("no peer connection yet");
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
      state: State;
    };
  }
}

window.callPeerTest = { join, openChat, send, state };
