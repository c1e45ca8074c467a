// The page side of cors_browser.test.ts: an application on one origin using the built SDK's
// RestClient against a Parley server on another origin. Plain JavaScript, served as is.
import { RestClient } from "/sdk.js";

window.harness = {
  /** PUT /v1/channels/{id}/read from this page; the read state, or the error's code. */
  async markRead({ baseUrl, token, channelId, seq }) {
    const rest = new RestClient({ baseUrl, token, maxRetries: 0, timeoutMs: 10_000 });
    try {
      return { ok: await rest.markRead(channelId, seq) };
    } catch (e) {
      return { error: e.code ?? String(e) };
    }
  },
};
document.title = "ready";
