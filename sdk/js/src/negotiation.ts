//! The pure parts of perfect negotiation (no RTCPeerConnection here), unit-tested alone.
//!
//! Perfect negotiation (W3C WebRTC §10.7 pattern): both sides offer whenever they need to; when
//! offers collide, the *polite* side gives way (rolls back and answers) and the *impolite* side
//! ignores the colliding offer. Parley assigns the roles per pair (the earlier joiner is
//! impolite) and settles glare the same way on the server.

export type SignalingStateLike =
  | "stable"
  | "have-local-offer"
  | "have-remote-offer"
  | "have-local-pranswer"
  | "have-remote-pranswer"
  | "closed";

export interface NegotiationSnapshot {
  polite: boolean;
  /** An offer of ours is being created/set (between `setLocalDescription()` and its end). */
  makingOffer: boolean;
  signalingState: SignalingStateLike;
  /** We are applying a remote answer right now. */
  settingRemoteAnswer: boolean;
}

export interface DescriptionDecision {
  /** The remote offer collides with one of ours. */
  collision: boolean;
  /** Drop the remote offer (impolite side in a collision); otherwise apply it. */
  ignore: boolean;
}

/** What to do with a remote `offer` or `answer`. */
export function decideRemoteDescription(type: "offer" | "answer", s: NegotiationSnapshot): DescriptionDecision {
  const readyForOffer = !s.makingOffer && (s.signalingState === "stable" || s.settingRemoteAnswer);
  const collision = type === "offer" && !readyForOffer;
  return { collision, ignore: collision && !s.polite };
}

/** The `a=ice-ufrag` of an SDP (the first one; with BUNDLE every section shares it). */
export function iceUfrag(sdp: string | undefined): string | undefined {
  if (!sdp) return undefined;
  const match = /^a=ice-ufrag:(\S+)/m.exec(sdp);
  return match?.[1];
}

/** Whether an offer restarts ICE: its credentials differ from those we used before. */
export function isIceRestart(previousLocalUfrag: string | undefined, offerSdp: string): boolean {
  const next = iceUfrag(offerSdp);
  return previousLocalUfrag !== undefined && next !== undefined && next !== previousLocalUfrag;
}

/**
 * A trickled candidate from the wire (`candidate:...`, optionally prefixed `a=`) as an
 * `RTCIceCandidateInit`. Parley relays the candidate line only, without `sdpMid` or
 * `sdpMLineIndex`; with `bundlePolicy: "max-bundle"` every candidate belongs to the first
 * m-section's transport, so index 0 is right.
 */
export function candidateFromWire(candidate: string): { candidate: string; sdpMLineIndex: number; sdpMid: string | null } {
  const line = candidate.startsWith("a=") ? candidate.slice(2) : candidate;
  return { candidate: line, sdpMLineIndex: 0, sdpMid: null };
}

/** Decides the wire signal for a local ICE candidate event: a candidate, or the end of them. */
export function candidateToWire(candidate: { candidate: string } | null):
  | { kind: "candidate"; candidate: string }
  | { kind: "end_of_candidates" } {
  if (!candidate || candidate.candidate === "") return { kind: "end_of_candidates" };
  return { kind: "candidate", candidate: candidate.candidate };
}

/** Whether a refused signal (a `conflict` error with its `reason`) says an ICE restart is required. */
export function needsIceRestart(reason: string | undefined): boolean {
  return reason === "ice_restart_required";
}
