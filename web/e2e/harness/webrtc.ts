/**
 * What the browser tests install in every page before the app runs (`context.addInitScript`):
 * an RTCPeerConnection that keeps WebRTC on loopback and can be found again for `getStats()`.
 *
 * - ICE candidates other than 127.0.0.1 never reach the page's `icecandidate` handlers, and
 *   `a=candidate` lines of other addresses are taken out of the local descriptions the page reads,
 *   so the SDK signals 127.0.0.1 candidates only and no packet goes to another address.
 * - Every peer connection is kept in `window.__parleyTest.pcs`.
 *
 * The function is serialized into the page: it must not use anything from outside its body.
 */
export function installLoopbackWebRTC(): void {
  type Handler = ((this: RTCPeerConnection, ev: RTCPeerConnectionIceEvent) => unknown) | null;
  const w = window as unknown as {
    RTCPeerConnection: typeof RTCPeerConnection;
    __parleyTest?: { pcs: RTCPeerConnection[]; dropped: string[] };
  };
  if (w.__parleyTest) return;
  const test = { pcs: [] as RTCPeerConnection[], dropped: [] as string[] };
  w.__parleyTest = test;
  const isLoopback = (candidate: string): boolean => {
    const fields = candidate.replace(/^a=/, "").split(" ");
    return fields.length > 5 && fields[4] === "127.0.0.1";
  };
  const keep = (ev: RTCPeerConnectionIceEvent): boolean => {
    const c = ev.candidate?.candidate;
    if (!c) return true; // end of candidates
    if (isLoopback(c)) return true;
    test.dropped.push(c);
    return false;
  };
  const filterSdp = (d: RTCSessionDescription | null): RTCSessionDescription | null => {
    if (!d || !d.sdp) return d;
    const sdp = d.sdp
      .split("\r\n")
      .filter((line) => !line.startsWith("a=candidate:") || isLoopback(line))
      .join("\r\n");
    return new RTCSessionDescription({ type: d.type, sdp });
  };
  const Native = w.RTCPeerConnection;
  const wrapped = new WeakMap<object, EventListener>();
  class LoopbackPeerConnection extends Native {
    #handler: Handler = null;
    constructor(configuration?: RTCConfiguration) {
      super(configuration);
      test.pcs.push(this);
      super.onicecandidate = (ev: RTCPeerConnectionIceEvent) => {
        if (this.#handler && keep(ev)) this.#handler.call(this, ev);
      };
    }
    override get onicecandidate(): Handler {
      return this.#handler;
    }
    override set onicecandidate(handler: Handler) {
      this.#handler = handler;
    }
    override addEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | AddEventListenerOptions): void {
      if (type !== "icecandidate") return super.addEventListener(type, listener, options);
      let filtered = wrapped.get(listener);
      if (!filtered) {
        filtered = (ev: Event) => {
          if (!keep(ev as RTCPeerConnectionIceEvent)) return;
          if (typeof listener === "function") listener.call(this, ev);
          else listener.handleEvent(ev);
        };
        wrapped.set(listener, filtered);
      }
      super.addEventListener(type, filtered, options);
    }
    override removeEventListener(type: string, listener: EventListenerOrEventListenerObject, options?: boolean | EventListenerOptions): void {
      const filtered = type === "icecandidate" ? wrapped.get(listener) : undefined;
      super.removeEventListener(type, filtered ?? listener, options);
    }
    override get localDescription(): RTCSessionDescription | null {
      return filterSdp(super.localDescription);
    }
    override get currentLocalDescription(): RTCSessionDescription | null {
      return filterSdp(super.currentLocalDescription);
    }
    override get pendingLocalDescription(): RTCSessionDescription | null {
      return filterSdp(super.pendingLocalDescription);
    }
  }
  w.RTCPeerConnection = LoopbackPeerConnection;
}

/** Video frames decoded so far over every peer connection of the page (inbound-rtp, video). */
export async function framesDecodedIn(page: import("playwright-core").Page): Promise<number> {
  return page.evaluate(async () => {
    const pcs = (window as unknown as { __parleyTest?: { pcs: RTCPeerConnection[] } }).__parleyTest?.pcs ?? [];
    let frames = 0;
    for (const pc of pcs) {
      if (pc.connectionState === "closed") continue;
      const stats = await pc.getStats();
      stats.forEach((s: { type: string; kind?: string; framesDecoded?: number }) => {
        if (s.type === "inbound-rtp" && s.kind === "video") frames += s.framesDecoded ?? 0;
      });
    }
    return frames;
  });
}

/** Candidates the page's peer connections gathered on other addresses and kept to themselves. */
export async function droppedCandidates(page: import("playwright-core").Page): Promise<string[]> {
  return page.evaluate(() => (window as unknown as { __parleyTest?: { dropped: string[] } }).__parleyTest?.dropped ?? []);
}

/** The remote ICE ufrag of each open peer connection of the page (it changes with an ICE restart). */
export async function remoteIceUfrags(page: import("playwright-core").Page): Promise<string[]> {
  return page.evaluate(() => {
    const pcs = (window as unknown as { __parleyTest?: { pcs: RTCPeerConnection[] } }).__parleyTest?.pcs ?? [];
    return pcs
      .filter((pc) => pc.connectionState !== "closed")
      .map((pc) => /^a=ice-ufrag:(\S+)/m.exec(pc.currentRemoteDescription?.sdp ?? "")?.[1] ?? "");
  });
}
