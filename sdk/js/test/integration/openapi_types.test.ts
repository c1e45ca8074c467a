/**
 * The committed `src/generated/openapi.ts` is exactly what the generator makes of the live
 * server's `/v1/openapi.json`: the SDK's REST and event types cannot drift from the server.
 */
import { readFileSync } from "node:fs";
import { afterAll, beforeAll, expect, it } from "vitest";
import { OUTPUT, render } from "../../scripts/generate-types.mjs";
import { startServer, type TestServer } from "../helpers/server.js";

let server: TestServer;

beforeAll(async () => {
  server = await startServer();
});

afterAll(async () => {
  await server?.stop();
});

it("src/generated/openapi.ts matches the server's OpenAPI document", async () => {
  const response = await fetch(`${server.url}/v1/openapi.json`);
  expect(response.status).toBe(200);
  const document: unknown = await response.json();
  const fresh = await render(document);
  const committed = readFileSync(OUTPUT, "utf8");
  // On failure: `npm run generate -- ${server.url}/v1/openapi.json`, review the diff, commit.
  expect(committed === fresh, "src/generated/openapi.ts is stale: regenerate it from the server (npm run generate)").toBe(true);
});

it("every REST operation of the document has a RestClient method", async () => {
  const document = (await (await fetch(`${server.url}/v1/openapi.json`)).json()) as {
    paths: Record<string, Record<string, { operationId?: string }>>;
  };
  const operations = Object.values(document.paths)
    .flatMap((methods) => Object.values(methods).map((op) => op.operationId))
    .filter((id): id is string => typeof id === "string")
    .sort();
  // operationId → RestClient method. A new operation fails here until the SDK has a method.
  const covered: Record<string, string> = {
    get_call: "getCall",
    end_call: "endCall",
    join_call: "joinCall",
    leave_call: "leaveCall",
    list_channels: "listChannels",
    create_channel: "createChannel",
    get_channel: "getChannel",
    delete_channel: "deleteChannel",
    patch_channel: "renameChannel",
    channel_calls: "channelCalls",
    start_call: "startCall",
    list_members: "listMembers",
    add_member: "addMember",
    update_member: "updateMemberRole",
    remove_member: "removeMember",
    history: "history",
    events: "events",
    send_message: "sendMessage",
    delete_message: "deleteMessage",
    edit_message: "editMessage",
    read_state: "readState",
    mark_read: "markRead",
    typing: "typing",
    presence_query: "queryPresence",
    user_presence: "userPresence",
    dev_token: "devToken",
  };
  const { RestClient } = await import("../../src/rest.js");
  for (const op of operations) {
    const method = covered[op];
    expect(method, `operation ${op} has no RestClient method`).toBeDefined();
    expect(typeof (RestClient.prototype as unknown as Record<string, unknown>)[method!], `RestClient.${method}`).toBe("function");
  }
});
