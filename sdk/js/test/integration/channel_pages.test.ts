/**
 * `GET /v1/channels` comes in pages: `rest.listChannels({limit, cursor})` returns one page with
 * its `next_cursor`, `rest.allChannels()` follows the cursors to the last page, and
 * `client.refreshUnread()` covers every page.
 */
import { afterAll, beforeAll, expect, it } from "vitest";
import { ParleyError, type ParleyClient } from "../../src/index.js";
import { clientFor } from "../helpers/clients.js";
import { startServer, type TestServer } from "../helpers/server.js";

let server: TestServer;
let carol: ParleyClient;
/** Carol's channels, newest first (the server's order: channel id descending). */
let created: string[];

beforeAll(async () => {
  server = await startServer();
  carol = await clientFor(server, "carol");
  created = [];
  for (let i = 0; i < 5; i++) created.push((await carol.rest.createChannel({ kind: "channel", name: `c${i}` })).id);
  created.sort().reverse();
});

afterAll(async () => {
  carol?.close();
  await server?.stop();
});

it("listChannels returns one page and the cursor of the next", async () => {
  const first = await carol.rest.listChannels({ limit: 2 });
  expect(first.channels.map((c) => c.id)).toEqual(created.slice(0, 2));
  expect(typeof first.next_cursor).toBe("string");
  const second = await carol.rest.listChannels({ limit: 2, cursor: first.next_cursor ?? undefined });
  expect(second.channels.map((c) => c.id)).toEqual(created.slice(2, 4));
  const last = await carol.rest.listChannels({ limit: 2, cursor: second.next_cursor ?? undefined });
  expect(last.channels.map((c) => c.id)).toEqual(created.slice(4));
  expect(last.next_cursor).toBeNull();
  const all = await carol.rest.listChannels();
  expect(all.channels).toHaveLength(5);
  expect(all.next_cursor, "5 channels fit the default page").toBeNull();
});

it("allChannels follows the cursors to the last page", async () => {
  const paged = await carol.rest.allChannels({ pageSize: 2 });
  expect(paged.map((c) => c.id)).toEqual(created);
  expect((await carol.rest.allChannels()).map((c) => c.id)).toEqual(created);
});

it("refuses a limit out of range and a cursor the server did not hand out", async () => {
  await expect(carol.rest.listChannels({ limit: 0 })).rejects.toMatchObject({ code: "invalid_argument" });
  await expect(carol.rest.listChannels({ limit: 201 })).rejects.toMatchObject({ code: "invalid_argument" });
  const refused = await carol.rest.listChannels({ cursor: "not-a-cursor" }).catch((e: unknown) => e);
  expect(refused).toBeInstanceOf(ParleyError);
  expect(refused).toMatchObject({ code: "invalid_argument", status: 400 });
});

it("refreshUnread covers every channel", async () => {
  const unread = await carol.refreshUnread();
  expect([...unread.keys()].sort()).toEqual([...created].sort());
});
