/**
 * Keeps WebRTC on loopback: only ICE candidates on 127.0.0.1 may travel between peers, so no
 * packet is ever sent to another address. Used both as the SDK's candidate filter (in the page)
 * and to check what was signalled.
 */

/** True when an ICE candidate line (`candidate:... 127.0.0.1 ...`) is a 127.0.0.1 candidate. */
export function isLoopbackCandidate(candidate: string): boolean {
  // candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
  const fields = candidate.replace(/^a=/, "").split(" ");
  return fields.length > 5 && fields[4] === "127.0.0.1";
}
