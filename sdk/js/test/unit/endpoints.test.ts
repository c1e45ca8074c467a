/** The address list of a deployment: validation, order, hand-over on failure. */
import { describe, expect, it } from "vitest";
import { Endpoints } from "../../src/endpoints.js";

describe("Endpoints", () => {
  it("keeps the listed order, drops trailing slashes and hands over round robin", () => {
    const e = new Endpoints(["http://a:1/", "http://b:2"], "listed");
    expect(e.all).toEqual(["http://a:1", "http://b:2"]);
    expect(e.current).toBe("http://a:1");
    e.failed("http://b:2"); // not the current one: nothing moves
    expect(e.current).toBe("http://a:1");
    e.failed("http://a:1");
    expect(e.current).toBe("http://b:2");
    e.failed("http://b:2");
    expect(e.current).toBe("http://a:1");
  });

  it("a single address stays current", () => {
    const e = new Endpoints("http://a:1");
    e.failed("http://a:1");
    expect(e.current).toBe("http://a:1");
  });

  it("shuffles by default, so clients spread over the addresses", () => {
    const urls = ["http://a:1", "http://b:2", "http://c:3"];
    const firsts = new Set<string>();
    for (let i = 0; i < 200; i++) {
      const e = new Endpoints(urls);
      expect([...e.all].sort()).toEqual(urls);
      firsts.add(e.current);
    }
    expect(firsts.size).toBe(3);
  });

  it("refuses an empty list and what is not an http(s) URL", () => {
    expect(() => new Endpoints([])).toThrow(/no server address/);
    expect(() => new Endpoints(["ws://a:1"])).toThrow(/http or https/);
    expect(() => new Endpoints(["not a url"])).toThrow(/not a URL/);
  });
});
