// A TCP proxy between the SDK and the server that the test can cut: `reset()` kills every open
// connection with a TCP RST (a real socket fault), `down()` also stops accepting (connections are
// refused), `up()` listens again on the same port.
import net from "node:net";

export class TcpProxy {
  readonly #target: number;
  #server: net.Server | undefined;
  #port = 0;
  readonly #pairs = new Set<[net.Socket, net.Socket]>();
  /** Connections accepted so far. */
  accepted = 0;
  /** Connections cut by `reset()`. */
  cuts = 0;
  #muted = false;

  constructor(targetPort: number) {
    this.#target = targetPort;
  }

  get port(): number {
    return this.#port;
  }

  get url(): string {
    return `http://127.0.0.1:${this.#port}`;
  }

  /** Listens (on a new port the first time, on the same port afterwards). */
  async up(): Promise<void> {
    if (this.#server) return;
    const server = net.createServer((client) => this.#accept(client));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.#port, "127.0.0.1", () => resolve());
    });
    this.#port = (server.address() as net.AddressInfo).port;
    this.#server = server;
  }

  /** Stops listening and cuts every connection: the SDK's reconnects are refused. */
  async down(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    this.reset();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  /** Cuts every open connection with a TCP RST. */
  reset(): void {
    this.#muted = false;
    for (const pair of this.#pairs) {
      for (const socket of pair) socket.resetAndDestroy();
      this.cuts += 1;
    }
    this.#pairs.clear();
  }

  /**
   * From now on, bytes from the server are dropped (until the next `reset()`): requests still
   * reach the server, its answers never reach the SDK.
   */
  muteDownstream(): void {
    this.#muted = true;
  }

  get open(): number {
    return this.#pairs.size;
  }

  #accept(client: net.Socket): void {
    this.accepted += 1;
    const upstream = net.connect(this.#target, "127.0.0.1");
    const pair: [net.Socket, net.Socket] = [client, upstream];
    this.#pairs.add(pair);
    const drop = () => {
      if (!this.#pairs.delete(pair)) return;
      client.destroy();
      upstream.destroy();
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
    client.pipe(upstream);
    upstream.on("data", (chunk: Buffer) => {
      if (this.#muted) return;
      if (!client.write(chunk)) {
        upstream.pause();
        client.once("drain", () => upstream.resume());
      }
    });
  }
}
