/**
 * A TCP proxy on 127.0.0.1 in front of the server, so a test can cut one browser's connections
 * for real: `resetAll()` destroys both halves of every proxied connection with a TCP RST, the
 * browser sees its WebSocket fail as on a network loss, and new connections go through again.
 */
import { createConnection, createServer, type Server, type Socket } from "node:net";

export interface TcpProxy {
  port: number;
  /** Connections accepted so far. */
  accepted(): number;
  /** Resets every open connection (RST on both sides). Returns how many were cut. */
  resetAll(): number;
  close(): Promise<void>;
}

export async function startProxy(targetPort: number): Promise<TcpProxy> {
  const open = new Set<Socket>();
  let accepted = 0;
  const server: Server = createServer((client) => {
    accepted += 1;
    const upstream = createConnection({ host: "127.0.0.1", port: targetPort });
    open.add(client);
    open.add(upstream);
    const drop = (s: Socket) => () => {
      open.delete(s);
    };
    client.on("close", drop(client));
    upstream.on("close", drop(upstream));
    client.on("error", () => upstream.destroy());
    upstream.on("error", () => client.destroy());
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const address = server.address();
  if (address === null || typeof address === "string") throw new Error("proxy has no TCP address");
  return {
    port: address.port,
    accepted: () => accepted,
    resetAll() {
      const cut = open.size;
      for (const s of [...open]) s.resetAndDestroy();
      open.clear();
      return cut;
    },
    async close() {
      for (const s of [...open]) s.destroy();
      open.clear();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
