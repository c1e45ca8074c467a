//! `Endpoints`: the addresses of one Parley deployment (several edges, say) and which one is in
//! use. The realtime connection and the REST client of a `ParleyClient` share one list, so REST
//! follows the WebSocket to the address that answers. An address that fails (a connection lost
//! or refused, a network error) hands over to the next one in the list, round robin; the
//! reconnect backoff still applies between attempts. See docs/failover.md.

/**
 * How a list of several addresses is ordered:
 * - `random` (the default): shuffled once per client, so the clients of a deployment spread
 *   over its addresses and, when one fails, over the others;
 * - `listed`: the order given (a primary first, then fallbacks).
 */
export type UrlOrder = "random" | "listed";

export class Endpoints {
  readonly #urls: readonly string[];
  #index = 0;

  /**
   * `urls`: one base URL (`http://127.0.0.1:8080`) or several of the same deployment. Trailing
   * slashes are dropped; each must be `http:` or `https:`.
   */
  constructor(urls: string | readonly string[], order: UrlOrder = "random", random: () => number = Math.random) {
    const list = (typeof urls === "string" ? [urls] : [...urls]).map((u) => u.replace(/\/+$/, ""));
    if (list.length === 0) throw new TypeError("parley: no server address: give `url` one URL or a list of them");
    for (const u of list) {
      let parsed: URL;
      try {
        parsed = new URL(u);
      } catch {
        throw new TypeError(`parley: ${JSON.stringify(u)} is not a URL`);
      }
      if (parsed.protocol !== "http:" && parsed.protocol !== "https:") {
        throw new TypeError(`parley: ${JSON.stringify(u)}: the scheme must be http or https`);
      }
    }
    if (order === "random") {
      // Fisher–Yates.
      for (let i = list.length - 1; i > 0; i--) {
        const j = Math.floor(random() * (i + 1));
        [list[i], list[j]] = [list[j] as string, list[i] as string];
      }
    }
    this.#urls = list;
  }

  /** Every address, in the order they are tried. */
  get all(): readonly string[] {
    return this.#urls;
  }

  get size(): number {
    return this.#urls.length;
  }

  /** The address in use: the next connection and REST request go there. */
  get current(): string {
    return this.#urls[this.#index] as string;
  }

  /**
   * `url` failed: if it is still the current address, the next one in the list becomes current
   * (a failure already handed over by someone else moves nothing).
   */
  failed(url: string): void {
    if (this.#urls.length > 1 && this.current === url) this.#index = (this.#index + 1) % this.#urls.length;
  }
}

/** The WebSocket URL under a base URL. */
export function wsUrlOf(base: string): string {
  return base.replace(/^http/, "ws") + "/v1/ws";
}
