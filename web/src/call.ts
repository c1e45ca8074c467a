//! The call panel: start or join the call of a conversation, send camera and microphone, and show
//! one video tile per participant. Media and negotiation are the SDK's `CallSession`.
//!
//! While nobody else is in the call the panel says so ("Calling bob…", or that bob is offline);
//! in a DM the caller gives up after the ring time ("No answer"), which ends the call, and both
//! sides then see it as a missed call in the conversation. Joins and leaves are announced.
//!
//! The tiles are a grid, one per participant. When the server moves the call to the SFU (past
//! its participant threshold) the SDK moves the media by itself; the panel says so, and marks the
//! participant the SFU announces as the active speaker.
import { isParleyError, joinCall, type CallPeerInfo, type CallSession, type ParleyClient } from "@parley/sdk";
import { h, replaceChildren } from "./dom.js";
import { ringTimeoutMs } from "./ring.js";
import type { AppState } from "./state.js";

interface Tile {
  element: HTMLElement;
  video: HTMLVideoElement;
  caption: HTMLElement;
}

export class CallController {
  readonly #client: ParleyClient;
  readonly #state: AppState;
  readonly #container: HTMLElement;
  readonly #onChange: () => void;
  #session: CallSession | null = null;
  #joining = false;
  #local: MediaStream | null = null;
  #panel: HTMLElement | null = null;
  #status: HTMLElement | null = null;
  /** "Calling bob…" while nobody else is in the call. */
  #waiting: HTMLElement | null = null;
  #notices: HTMLElement | null = null;
  #noAnswer: ReturnType<typeof setTimeout> | undefined;
  /** Participants in the call with us (for the join and leave notices). */
  readonly #present = new Set<string>();
  readonly #tiles = new Map<string, Tile>();
  /** The tile of the active speaker (SFU mode). */
  #speaker: string | null = null;
  /** SFU mode: the size last asked of each remote video track ("WxH"), by track id. */
  readonly #askedSizes = new Map<string, string>();
  #sizeTimer: ReturnType<typeof setTimeout> | undefined;
  readonly #onResize = () => this.#sizeSoon();
  /** Remote tiles scrolled out of the grid's view (their video is paused at the SFU). */
  readonly #hidden = new Set<string>();
  readonly #visibility =
    typeof IntersectionObserver === "undefined"
      ? null
      : new IntersectionObserver((entries) => {
          for (const entry of entries) {
            const id = (entry.target as HTMLElement).dataset.participantId;
            if (!id) continue;
            if (entry.isIntersecting) this.#hidden.delete(id);
            else this.#hidden.add(id);
          }
          this.#sizeSoon();
        });

  constructor(client: ParleyClient, state: AppState, container: HTMLElement, onChange: () => void) {
    this.#client = client;
    this.#state = state;
    this.#container = container;
    this.#onChange = onChange;
  }

  /** The channel whose call we are in, if any. */
  get channelId(): string | null {
    return this.#session?.channelId ?? null;
  }

  /** Starts the conversation's call (or gets the one already running) and joins it. */
  async startOrJoin(channelId: string): Promise<void> {
    if (this.#joining || this.#session?.channelId === channelId) return;
    if (this.#session) await this.leave();
    this.#joining = true;
    const c = this.#state.conversations.get(channelId);
    const title = c ? this.#state.title(c) : channelId;
    this.#showPanel(title, "Joining…");
    try {
      this.#local = await localMedia();
      if (this.#local) this.#tile("local", `${this.#state.me} (you)`, true).video.srcObject = this.#local;
      const options = this.#local ? { stream: this.#local } : {};
      let session: CallSession;
      try {
        const call = c?.call ?? (await this.#client.rest.startCall(channelId));
        session = await joinCall(this.#client, call.id, options);
      } catch (e) {
        // The call we knew of may have ended meanwhile: start (or get) the current one.
        if (!c?.call || !isParleyError(e, "not_found", "conflict")) throw e;
        const call = await this.#client.rest.startCall(channelId);
        session = await joinCall(this.#client, call.id, options);
      }
      this.#session = session;
      this.#wire(session);
      window.addEventListener("resize", this.#onResize);
      this.#setMode(session.mode);
      this.#setStatus(this.#inCallText());
      for (const peer of session.peers()) {
        this.#present.add(peer.participantId);
        this.#peerTile(peer);
      }
      if (session.peers().length === 0) this.#awaitAnswer(channelId, title);
    } catch (e) {
      this.#teardown();
      this.#showPanel(title, `Could not join the call: ${e instanceof Error ? e.message : String(e)}`, true);
    } finally {
      this.#joining = false;
      this.#onChange();
    }
  }

  /** Leaves the call, if in one. */
  async leave(): Promise<void> {
    const session = this.#session;
    this.#teardown();
    this.#onChange();
    await session?.leave().catch((e: unknown) => console.warn("parley: leaving the call failed", e));
  }

  async leaveIfIn(channelId: string): Promise<void> {
    if (this.#session?.channelId === channelId) await this.leave();
  }

  /** Nobody else is in the call yet: say whom we wait for; in a DM, give up after the ring time. */
  #awaitAnswer(channelId: string, title: string): void {
    const c = this.#state.conversations.get(channelId);
    const partner = c ? this.#state.dmPartner(c) : null;
    let text = c?.channel.kind === "dm" ? `Calling ${title}…` : "Waiting for others to join…";
    if (partner && (this.#state.presence.get(partner) ?? "offline") === "offline") {
      text = `${partner} is offline. They will see a missed call.`;
    }
    this.#setWaiting(text);
    if (c?.channel.kind !== "dm") return;
    const session = this.#session;
    clearTimeout(this.#noAnswer);
    this.#noAnswer = setTimeout(() => {
      if (!session || this.#session !== session || this.#present.size > 0) return;
      void this.leave().then(() => this.#showPanel(title, `No answer from ${partner ?? title}.`, true));
    }, ringTimeoutMs());
  }

  #setWaiting(text: string): void {
    if (!this.#waiting) return;
    this.#waiting.textContent = text;
    this.#waiting.hidden = text === "";
  }

  #notice(text: string): void {
    if (!this.#notices) return;
    this.#notices.append(h("li", {}, text));
    while (this.#notices.children.length > 3) this.#notices.firstElementChild?.remove();
  }

  #wire(session: CallSession): void {
    session.on("peer.joined", (peer) => {
      this.#peerTile(peer);
      if (!this.#present.has(peer.participantId)) {
        this.#present.add(peer.participantId);
        this.#notice(`${peer.userId} joined the call`);
      }
      clearTimeout(this.#noAnswer);
      this.#setWaiting("");
    });
    session.on("track", ({ participantId, userId, role, track, streams }) => {
      const tile = this.#peerTile({ participantId, userId, role });
      const stream = streams[0] ?? new MediaStream([track]);
      if (tile.video.srcObject !== stream) tile.video.srcObject = stream;
      // A stream that gained a track after being attached plays it without re-attaching; make
      // sure a paused element starts again.
      void tile.video.play().catch(() => {});
      this.#sizeSoon();
    });
    session.on("tracks.changed", () => this.#sizeSoon());
    session.on("track.removed", ({ participantId, streams }) => {
      const tile = this.#tiles.get(participantId);
      if (tile && streams[0] && streams[0].getTracks().length === 0 && tile.video.srcObject === streams[0]) tile.video.srcObject = null;
    });
    session.on("mode", ({ mode }) => {
      this.#setMode(mode);
      if (mode === "sfu") this.#notice("The call moved to the server (SFU)");
      this.#setStatus(this.#inCallText());
    });
    session.on("active_speaker", ({ participantId }) => this.#markSpeaker(participantId === session.participantId ? "local" : participantId));
    session.on("peer.left", ({ participantId, userId, reason }) => {
      this.#removeTile(participantId);
      if (this.#present.delete(participantId)) {
        this.#notice(reason === "timeout" ? `${userId} lost their connection and left the call` : `${userId} left the call`);
      }
      if (this.#present.size === 0 && this.#session === session) this.#setWaiting("You are the only one in the call.");
    });
    session.on("peer.reconnecting", ({ participantId }) => this.#tiles.get(participantId)?.element.setAttribute("data-state", "reconnecting"));
    session.on("peer.reconnected", ({ participantId }) => this.#tiles.get(participantId)?.element.removeAttribute("data-state"));
    session.on("peer.connectionstatechange", ({ participantId, state }) => {
      const tile = this.#tiles.get(participantId);
      if (tile) tile.element.dataset.connection = state;
    });
    session.on("statechange", ({ state }) => {
      if (state === "reconnecting") this.#setStatus("Reconnecting…");
      else if (state === "active") this.#setStatus(this.#inCallText());
    });
    session.on("ended", ({ reason }) => {
      if (this.#session !== session) return;
      this.#teardown();
      if (reason !== "left") {
        const c = this.#state.conversations.get(session.channelId);
        this.#showPanel(c ? this.#state.title(c) : session.channelId, reason === "call_ended" || reason === "ended" ? "The call ended." : `You left the call (${reason}).`, true);
      }
      this.#onChange();
    });
    session.on("error", (e) => console.warn("parley: call", e));
  }

  #showPanel(title: string, status: string, closable = false): void {
    this.#status = h("p", { class: "call-status", role: "status", id: "call-status" }, status);
    this.#waiting = h("p", { class: "call-waiting", role: "status", id: "call-waiting", hidden: true });
    this.#notices = h("ul", { class: "call-notices", role: "log", "aria-live": "polite", id: "call-notices" });
    const controls: HTMLElement[] = [];
    if (closable) {
      controls.push(h("button", { class: "button", type: "button", onclick: () => this.#closePanel() }, "Close"));
    } else {
      controls.push(
        toggle("Mute microphone", (off) => this.#local?.getAudioTracks().forEach((t) => (t.enabled = !off))),
        toggle("Turn camera off", (off) => this.#local?.getVideoTracks().forEach((t) => (t.enabled = !off))),
        h("button", { class: "button danger", type: "button", id: "leave-call", onclick: () => void this.leave() }, "Leave"),
      );
    }
    const tiles = h("div", { class: "tiles", id: "call-tiles" });
    const panel = h(
      "section",
      { class: "call", "aria-label": `Call in ${title}`, id: "call-panel" },
      h("div", { class: "call-head" }, h("h3", {}, `Call · ${title}`), ...controls),
      this.#status,
      this.#waiting,
      this.#notices,
      tiles,
    );
    for (const tile of this.#tiles.values()) tiles.append(tile.element);
    this.#panel?.remove();
    this.#panel = panel;
    this.#container.append(panel);
  }

  #closePanel(): void {
    this.#panel?.remove();
    this.#panel = null;
  }

  #inCallText(): string {
    const sfu = this.#session?.mode === "sfu" ? " · through the server (SFU)" : "";
    return (this.#local ? "In call" : "In call (no camera or microphone: receiving only)") + sfu;
  }

  #setMode(mode: string): void {
    if (this.#panel) this.#panel.dataset.mode = mode;
  }

  /** Asks the SFU for each remote video at its tile's size, shortly (tiles settle first). */
  #sizeSoon(): void {
    clearTimeout(this.#sizeTimer);
    this.#sizeTimer = setTimeout(() => this.#sizeTiles(), 300);
  }

  /**
   * SFU mode: tells the SFU the size of each remote video's tile (in device pixels), so that it
   * sends the smallest simulcast layer that fills it rather than the largest that fits the
   * bandwidth. Only changes are sent.
   */
  #sizeTiles(): void {
    const session = this.#session;
    if (!session || session.mode !== "sfu") return;
    const ratio = window.devicePixelRatio || 1;
    for (const track of session.remoteTracks()) {
      if (track.kind !== "video" || !track.subscribed) continue;
      const tile = this.#tiles.get(track.participantId);
      if (!tile || tile.element.clientWidth === 0) continue;
      const width = Math.round(tile.element.clientWidth * ratio);
      const height = Math.round(tile.element.clientHeight * ratio);
      // A tile out of view (a large call, scrolled) gets no video until it is back.
      const paused = this.#hidden.has(track.participantId);
      const key = `${width}x${height}${paused ? " paused" : ""}`;
      if (this.#askedSizes.get(track.trackId) === key) continue;
      this.#askedSizes.set(track.trackId, key);
      session.setVideo(track.trackId, { paused, maxSize: { width, height } }).catch((e: unknown) => {
        this.#askedSizes.delete(track.trackId);
        console.warn("parley: asking the SFU for a tile size", e);
      });
    }
  }

  /** Marks the tile of the active speaker (`null`: nobody). */
  #markSpeaker(tileId: string | null): void {
    this.#speaker = tileId;
    for (const [id, tile] of this.#tiles) {
      if (id === tileId) tile.element.dataset.speaking = "true";
      else delete tile.element.dataset.speaking;
    }
  }

  #setStatus(text: string): void {
    if (this.#status) this.#status.textContent = text;
  }

  #peerTile(peer: CallPeerInfo): Tile {
    return this.#tile(peer.participantId, peer.userId || "participant", false);
  }

  #tile(id: string, label: string, local: boolean): Tile {
    const existing = this.#tiles.get(id);
    if (existing) {
      if (label && existing.caption.textContent !== label) existing.caption.textContent = label;
      return existing;
    }
    const video = h("video", { autoplay: true, playsinline: true, "aria-label": local ? "Your camera" : `Video of ${label}` });
    video.muted = local;
    const caption = h("figcaption", {}, label);
    const element = h("figure", { class: "tile", "data-participant-id": id, "data-local": local ? "true" : null }, video, caption);
    if (id === this.#speaker) element.dataset.speaking = "true";
    if (!local) this.#visibility?.observe(element);
    this.#tiles.set(id, { element, video, caption });
    this.#panel?.querySelector(".tiles")?.append(element);
    return this.#tiles.get(id)!;
  }

  #removeTile(id: string): void {
    const tile = this.#tiles.get(id);
    if (!tile) return;
    tile.video.srcObject = null;
    this.#visibility?.unobserve(tile.element);
    this.#hidden.delete(id);
    tile.element.remove();
    this.#tiles.delete(id);
  }

  #teardown(): void {
    this.#session = null;
    this.#speaker = null;
    this.#askedSizes.clear();
    clearTimeout(this.#sizeTimer);
    window.removeEventListener("resize", this.#onResize);
    clearTimeout(this.#noAnswer);
    this.#present.clear();
    for (const id of [...this.#tiles.keys()]) this.#removeTile(id);
    for (const track of this.#local?.getTracks() ?? []) track.stop();
    this.#local = null;
    this.#closePanel();
    if (this.#panel) replaceChildren(this.#panel);
  }
}

/** Camera and microphone, or whichever of them is available, or null (join receiving only). */
async function localMedia(): Promise<MediaStream | null> {
  if (!navigator.mediaDevices?.getUserMedia) return null;
  for (const constraints of [{ audio: true, video: true }, { video: true }, { audio: true }]) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch {
      // Try with less.
    }
  }
  return null;
}

/** A toggle button: its label stays, `aria-pressed` says whether it is on (muted, camera off). */
function toggle(label: string, apply: (pressed: boolean) => void): HTMLButtonElement {
  const button = h("button", { class: "button toggle", type: "button", "aria-pressed": "false" }, label);
  button.addEventListener("click", () => {
    const pressed = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(pressed));
    apply(pressed);
  });
  return button;
}
