/** The examples run against a real server as a user would run them (from the built package). */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, beforeAll, expect, it } from "vitest";
import { RestClient } from "../../src/index.js";
import { startServer, type TestServer } from "../helpers/server.js";

const run = promisify(execFile);
const root = fileURLToPath(new URL("../..", import.meta.url));
let server: TestServer;

beforeAll(async () => {
  server = await startServer();
});

afterAll(async () => {
  await server?.stop();
});

it("examples/quickstart.mjs connects, subscribes, sends and prints the message", async () => {
  expect(existsSync(`${root}/dist/index.js`), "dist/ is built (npm run build) before the examples run").toBe(true);
  const token = await server.token("alice");
  const { stdout } = await run("node", ["examples/quickstart.mjs"], {
    cwd: root,
    timeout: 20_000,
    env: { ...process.env, PARLEY_URL: server.url, PARLEY_TOKEN: token },
  });
  expect(stdout).toContain("[connection] connected");
  expect(stdout).toMatch(/#\d+ alice: hello from the quick start/);
});

it("examples/quickstart.mjs signs in with a development token when none is given", async () => {
  const { stdout } = await run("node", ["examples/quickstart.mjs"], {
    cwd: root,
    timeout: 20_000,
    env: { ...process.env, PARLEY_URL: server.url, PARLEY_TOKEN: "" },
  }).catch((e: { stdout?: string; stderr?: string }) => {
    throw new Error(`quickstart failed: ${e.stderr ?? ""}${e.stdout ?? ""}`);
  });
  expect(stdout).toMatch(/#\d+ alice: hello from the quick start/);
});

it("RestClient.devToken gives a token the server accepts", async () => {
  const dev = await RestClient.devToken(server.url, { user_id: "dora" });
  expect(dev.user_id).toBe("dora");
  const rest = new RestClient({ baseUrl: server.url, token: dev.token });
  expect((await rest.listChannels()).channels).toEqual([]);
});
