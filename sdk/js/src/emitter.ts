//! A small typed event emitter (browsers have no `node:events`).

/** Maps event names to the type of their single argument. */
export type EventMap = { [name: string]: unknown };

export type Listener<T> = (value: T) => void;

export class Emitter<E extends EventMap> {
  readonly #listeners = new Map<keyof E, Set<Listener<never>>>();

  /** Calls `listener` for each `name` event; returns a function that removes it. */
  on<K extends keyof E>(name: K, listener: Listener<E[K]>): () => void {
    let set = this.#listeners.get(name);
    if (!set) {
      set = new Set();
      this.#listeners.set(name, set);
    }
    set.add(listener as Listener<never>);
    return () => this.off(name, listener);
  }

  /** Calls `listener` for the next `name` event only. */
  once<K extends keyof E>(name: K, listener: Listener<E[K]>): () => void {
    const off = this.on(name, (value) => {
      off();
      listener(value);
    });
    return off;
  }

  off<K extends keyof E>(name: K, listener: Listener<E[K]>): void {
    this.#listeners.get(name)?.delete(listener as Listener<never>);
  }

  /** Emits to every listener; a throwing listener is reported on the console, never to the caller. */
  protected emit<K extends keyof E>(name: K, value: E[K]): void {
    const set = this.#listeners.get(name);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        (listener as Listener<E[K]>)(value);
      } catch (e) {
        console.error(`parley: a "${String(name)}" listener threw`, e);
      }
    }
  }

  protected listenerCount(name: keyof E): number {
    return this.#listeners.get(name)?.size ?? 0;
  }
}
