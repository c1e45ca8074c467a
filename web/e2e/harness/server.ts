/**
 * Starts a real `parley serve` ($PARLEY_BIN) on 127.0.0.1 port 0 with its data in a temporary
 * folder, and stops it. Its stderr goes to a log file in the test's artefact folder.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { within } from "./wait.js";

export interface ServerOptions {
  /** Folder served at `/` (`--web-dir`); web/dist when absent. */
  webDir: string;
  /** Folder for `parley.log`. */
  logDir: string;
  /** More `parley serve` flags. */
  args?: string[];
}

export interface ParleyServer {
  port: number;
  /** `http://localhost:PORT`: the origin pages are loaded from (a secure context for getUserMedia). */
  origin: string;
  /** A development token for a user, from `POST /v1/dev/token`. */
  devToken(userId: string): Promise<string>;
  stop(): Promise<void>;
}

export function parleyBin(): string {
  const bin = process.env.PARLEY_BIN;
  if (!bin) {
    throw new Error(
      "PARLEY_BIN is not set: build the server (cargo build -p parley --locked) and set PARLEY_BIN " +
        "to ${CARGO_TARGET_DIR:-<repository>/target}/debug/parley (web/scripts/test.sh does)",
    );
  }
  return bin;
}

export async function startServer(options: ServerOptions): Promise<ParleyServer> {
  const dataDir = await mkdtemp(join(tmpdir(), "parley-web-e2e-"));
  const log = createWriteStream(join(options.logDir, "parley.log"), { flags: "a" });
  const child = spawn(
    parleyBin(),
    [
      "serve",
      "--listen",
      "127.0.0.1:0",
      "--data-dir",
      dataDir,
      "--web-dir",
      options.webDir,
      ...(options.args ?? []),
    ],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, PARLEY_LOG: process.env.PARLEY_LOG ?? "info" } },
  );
  child.stderr!.pipe(log);
  // If this test process dies without running its `after` hooks, the server goes with it.
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);
  void new Promise<void>((resolve) => child.once("exit", () => resolve())).then(() => process.off("exit", killOnExit));
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));

  let port: number;
  try {
    port = await within(
      "parley serve printing its `parley listening on` line",
      20_000,
      new Promise<number>((resolve, reject) => {
        const lines = createInterface({ input: child.stdout! });
        lines.once("line", (line) => {
          const m = /^parley listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(line);
          if (m) resolve(Number(m[1]));
          else reject(new Error(`unexpected first line from parley serve: ${line}`));
        });
        void exited.then((code) => reject(new Error(`parley serve exited with ${code} before listening (see parley.log)`)));
      }),
    );
  } catch (err) {
    await stopChild(child, exited);
    await rm(dataDir, { recursive: true, force: true });
    throw err;
  }
  child.stdout!.resume();

  const origin = `http://localhost:${port}`;
  return {
    port,
    origin,
    async devToken(userId: string): Promise<string> {
      const res = await fetch(`http://127.0.0.1:${port}/v1/dev/token`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ user_id: userId }),
        signal: AbortSignal.timeout(10_000),
      });
      if (!res.ok) throw new Error(`POST /v1/dev/token for ${userId}: HTTP ${res.status} ${await res.text()}`);
      const body = (await res.json()) as { token: string };
      return body.token;
    },
    async stop() {
      await stopChild(child, exited);
      log.end();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

async function stopChild(child: ChildProcess, exited: Promise<number | null>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
  await exited;
  clearTimeout(timer);
}
