// SDK clients for tests: Node's `ws` as the WebSocket, fast reconnects.
import WebSocket from "ws";
import { ParleyClient, type DeliveredEvent, type ParleyClientOptions } from "../../src/index.js";
import type { TestServer } from "./server.js";

export async function clientFor(
  server: TestServer,
  user: string,
  options: Partial<ParleyClientOptions> = {},
): Promise<ParleyClient> {
  const token = await server.token(user);
  return new ParleyClient({
    url: server.url,
    token,
    WebSocket,
    backoff: { initialMs: 50, maxMs: 1_000 },
    ...options,
  });
}

/** Records every event a client delivers, per channel. */
export class EventLog {
  readonly events: DeliveredEvent[] = [];
  constructor(client: ParleyClient) {
    client.on("event", (e) => this.events.push(e));
  }
  of(channelId: string, type?: DeliveredEvent["type"]): DeliveredEvent[] {
    return this.events.filter((e) => e.channel_id === channelId && (type === undefined || e.type === type));
  }
  texts(channelId: string): string[] {
    return this.of(channelId, "message.new").map((e) => (e.type === "message.new" ? e.message.text : ""));
  }
}
