// A multi-node deployment for failover tests: nodes that clients connect to, over the test
// PostgreSQL and NATS (PARLEY_TEST_DATABASE_URL, PARLEY_TEST_NATS_URL from scripts/services.sh).
//
// The topology is one switch, `PARLEY_TEST_TOPOLOGY`:
// - `all` (default): every node is `parley serve --role all` (today's single process) on the
//   shared PostgreSQL and NATS;
// - `split`: one `--role core` process (PostgreSQL + NATS) and the nodes are `--role edge`
//   processes (NATS only, no database credentials), which forward to the core.
// Killing a node is the same in both: the process the clients are connected to dies.
import { createHmac } from "node:crypto";
import { startServer, type TestServer } from "./server.js";

export type Topology = "all" | "split";

export function topology(): Topology {
  const t = process.env.PARLEY_TEST_TOPOLOGY ?? "all";
  if (t !== "all" && t !== "split") throw new Error(`PARLEY_TEST_TOPOLOGY must be all or split, got ${t}`);
  return t;
}

export function services(): { db: string; nats: string } {
  const db = process.env.PARLEY_TEST_DATABASE_URL;
  const nats = process.env.PARLEY_TEST_NATS_URL;
  if (!db || !nats) {
    throw new Error(
      'PARLEY_TEST_DATABASE_URL and PARLEY_TEST_NATS_URL are not set: run scripts/test.sh, or eval "$(scripts/services.sh start)" first',
    );
  }
  return { db, nats };
}

export interface Deployment {
  /** The processes clients connect to. */
  nodes: TestServer[];
  /** The core process of the `split` topology. */
  core: TestServer | undefined;
  /** An HS256 access token for `user` in the default tenant, valid for an hour. */
  token(user: string): string;
  stop(): Promise<void>;
}

/** Starts `count` nodes (and a core when the topology is `split`). */
export async function startDeployment(count: number, secret: string, extra: string[] = []): Promise<Deployment> {
  const { db, nats } = services();
  const jwt = ["--jwt-hs256-secret", secret];
  const started: TestServer[] = [];
  try {
    let core: TestServer | undefined;
    let nodeFlags: string[];
    if (topology() === "split") {
      core = await startServer(["--role", "core", "--database-url", db, "--nats-url", nats, ...jwt, ...extra]);
      started.push(core);
      // Edges connect as the edge user, which the test server forbids to publish persisted events
      // (scripts/services.sh): the split runs with the production permissions.
      const plain = process.env.PARLEY_TEST_NATS_PLAIN_URL;
      const user = process.env.PARLEY_TEST_NATS_EDGE_USER;
      const password = process.env.PARLEY_TEST_NATS_EDGE_PASSWORD;
      if (!plain || !user || !password) {
        throw new Error("PARLEY_TEST_NATS_PLAIN_URL and PARLEY_TEST_NATS_EDGE_USER/_PASSWORD are not set: start the services with scripts/services.sh");
      }
      nodeFlags = ["--role", "edge", "--nats-url", plain, "--nats-user", user, "--nats-password", password, ...jwt, ...extra];
    } else {
      nodeFlags = ["--database-url", db, "--nats-url", nats, ...jwt, ...extra];
    }
    const nodes: TestServer[] = [];
    for (let i = 0; i < count; i++) {
      const node = await startServer(nodeFlags);
      started.push(node);
      nodes.push(node);
    }
    return {
      nodes,
      core,
      token: (user) => hs256(secret, user),
      async stop() {
        for (const s of started.reverse()) await s.stop();
      },
    };
  } catch (e) {
    for (const s of started.reverse()) await s.stop();
    throw e;
  }
}

function hs256(secret: string, user: string): string {
  const b64 = (v: object) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const signing = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({
    sub: user,
    tid: "default",
    iss: "parley",
    aud: "parley",
    exp: Math.floor(Date.now() / 1000) + 3600,
  })}`;
  return `${signing}.${createHmac("sha256", secret).update(signing).digest("base64url")}`;
}
