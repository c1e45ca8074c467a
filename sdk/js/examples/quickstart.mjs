// @ts-check
// Quick start: connect, subscribe, send, print.
//
//   parley serve &                                  # prints: parley listening on http://127.0.0.1:8080
//   npm run build && node examples/quickstart.mjs   # in sdk/js
//
// PARLEY_URL defaults to http://127.0.0.1:8080. PARLEY_TOKEN is a token for the user
// (`parley token --user alice`); without it the example asks a development server for one.
import { ParleyClient, RestClient } from "@parley/sdk";
import WebSocket from "ws";

const url = process.env.PARLEY_URL ?? "http://127.0.0.1:8080";
const token = process.env.PARLEY_TOKEN || (await RestClient.devToken(url, { user_id: "alice" })).token;

// In browsers leave `WebSocket` out: the global one is used.
const client = new ParleyClient({ url, token, WebSocket });
client.connection.on("statechange", ({ current, reason }) => {
  console.log(`[connection] ${current}${reason ? ` (${reason})` : ""}`);
});

const channel = await client.rest.createChannel({ kind: "channel", name: "quickstart" });
console.log(`created channel ${channel.id}`);

let received = 0;
client.on("message.new", (event) => {
  console.log(`#${event.seq} ${event.message.sender_id}: ${event.message.text}`);
  received += 1;
});

await client.connect();
await client.subscribe(channel.id);
const { message } = await client.send(channel.id, "hello from the quick start");
console.log(`sent as seq ${message.seq}`);

// The message also comes back as a live event; wait for it (at most 5 s), then leave.
const deadline = Date.now() + 5_000;
while (received === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
client.close();
process.exit(received === 1 ? 0 : 1);
