// A real `parley serve` per test file: fresh data dir, port 0, killed when the file ends (also on
// failure, and on process exit as a last resort).
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);

/** The server binary: `PARLEY_BIN`, or the debug build in the project's target dir. */
export function parleyBin(): string {
  if (process.env.PARLEY_BIN) return process.env.PARLEY_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? fileURLToPath(new URL("../../../../target", import.meta.url));
  return join(target, "debug", "parley");
}

const running = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

export interface TestServer {
  /** `http://127.0.0.1:PORT` */
  url: string;
  port: number;
  dataDir: string;
  /** A token for `user` signed with this server's development key. */
  token(user: string, options?: { tenant?: string; ttl?: string }): Promise<string>;
  /** The server's stderr so far (for failure messages). */
  logs(): string;
  /** Sends a signal to the server process (SIGTERM: it drains). */
  signal(sig: NodeJS.Signals): void;
  stop(): Promise<void>;
}

/** Starts `parley serve --listen 127.0.0.1:0` with `flags`; resolves once it listens. */
export async function startServer(flags: string[] = []): Promise<TestServer> {
  const bin = parleyBin();
  const dataDir = mkdtempSync(join(tmpdir(), "parley-sdk-js-"));
  const child = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir, ...flags], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PARLEY_LOG: process.env.PARLEY_LOG ?? "warn" },
  });
  running.add(child);
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr += chunk.toString();
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
  });
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`parley serve did not print its address within 15 s; stderr:\n${stderr}`)), 15_000);
    child.once("error", (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot start ${bin}: ${e.message} (build it: cd /work/main && cargo build -p parley --locked)`));
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`parley serve exited with ${code} before listening; stderr:\n${stderr}`));
    });
    const lines = createInterface({ input: child.stdout! });
    lines.once("line", (line) => {
      clearTimeout(timer);
      const m = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(line);
      if (m) resolve(Number(m[1]));
      else reject(new Error(`unexpected first line from parley serve: ${line}`));
    });
  });
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    dataDir,
    async token(user, options = {}) {
      const args = ["token", "--user", user, "--data-dir", dataDir];
      if (options.tenant) args.push("--tenant", options.tenant);
      if (options.ttl) args.push("--ttl", options.ttl);
      const { stdout } = await run(bin, args, { timeout: 10_000 });
      return stdout.trim();
    },
    logs: () => stderr,
    signal: (sig) => {
      child.kill(sig);
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
        child.kill("SIGTERM");
        const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
        await exited;
        clearTimeout(timer);
      }
      running.delete(child);
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}
