/**
 * The SDK's frame and event types agree with the tables of docs/protocol.md: every type the doc
 * lists is known to the SDK with the same fields, and the SDK knows no type the doc does not list.
 * (The server side of the same types is generated from the OpenAPI document; see
 * test/integration/openapi_types.test.ts.)
 */
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import {
  CHANNEL_EVENT_FIELDS,
  CHANNEL_EVENT_TYPES,
  CLIENT_FRAME_FIELDS,
  SERVER_FRAME_FIELDS,
  SERVER_FRAME_TYPES,
} from "../../src/protocol.js";
import { CloseCode } from "../../src/protocol.js";

const doc = readFileSync(new URL("../../../../docs/protocol.md", import.meta.url), "utf8");

/** The rows of the first table after `heading`, as arrays of cells. */
function table(heading: string): string[][] {
  const start = doc.indexOf(heading);
  if (start < 0) throw new Error(`docs/protocol.md has no heading "${heading}"`);
  const lines = doc.slice(start).split("\n");
  const rows: string[][] = [];
  let inTable = false;
  for (const line of lines.slice(1)) {
    if (line.startsWith("|")) {
      inTable = true;
      rows.push(line.split("|").slice(1, -1).map((c) => c.trim()));
    } else if (inTable) break;
  }
  return rows.slice(2); // header and separator
}

/** `a` / `b` and `` `a` `` cells → the names in backquotes. */
function names(cell: string): string[] {
  return [...cell.matchAll(/`([^`]+)`/g)].map((m) => m[1]!);
}

/** A cell without what is in parentheses (value lists, remarks). */
function outsideParentheses(cell: string): string {
  let depth = 0;
  let outside = "";
  for (const ch of cell) {
    if (ch === "(") depth += 1;
    else if (ch === ")") depth = Math.max(0, depth - 1);
    else if (depth === 0) outside += ch;
  }
  return outside;
}

/** The field names of a fields cell: backquoted names outside parentheses, without `?`. */
function fieldNames(cell: string): string[] {
  return names(outsideParentheses(cell)).map((f) => f.replace(/[:\s].*$/, "").replace(/\?$/, ""));
}

const bare = (fields: readonly string[]) => fields.map((f) => f.replace(/\?$/, ""));

describe("docs/protocol.md", () => {
  it("client → server: the same frame types with the same fields", () => {
    const documented = new Map<string, string[]>();
    for (const [typeCell, fieldsCell] of table("### Client → server")) {
      // `signal: {kind, ...}` and `channels: [...]` name one field each; `op` (`a`, `b`) lists values.
      const fields = names(outsideParentheses(fieldsCell ?? "")).map((f) => f.replace(/[:\s].*$/, ""));
      for (const type of names(typeCell ?? "")) documented.set(type, fields.sort());
    }
    const sdk = new Map(Object.entries(CLIENT_FRAME_FIELDS).map(([t, f]) => [t, [...f].sort()]));
    expect([...sdk.keys()].sort()).toEqual([...documented.keys()].sort());
    for (const [type, fields] of documented) expect(sdk.get(type), `fields of ${type}`).toEqual(fields);
  });

  it("server → client: the same frame types (channel events aside)", () => {
    const documented = table("### Server → client")
      .flatMap(([typeCell]) => names(typeCell ?? ""))
      .sort();
    expect([...SERVER_FRAME_TYPES].sort()).toEqual(documented);
  });

  it("server → client: every field the doc lists is in the SDK's type of that frame", () => {
    for (const [typeCell, fieldsCell] of table("### Server → client")) {
      for (const type of names(typeCell ?? "")) {
        const sdk = SERVER_FRAME_FIELDS[type as keyof typeof SERVER_FRAME_FIELDS];
        if (!sdk) continue; // "channel events" row
        for (const field of fieldNames(fieldsCell ?? "")) {
          expect(bare(sdk), `field ${field} of ${type} (docs/protocol.md) in the SDK`).toContain(field);
        }
      }
    }
  });

  it("channel events: the payload fields of each event match the doc", () => {
    for (const [typeCell, payloadCell] of table("## Channel events")) {
      for (const type of names(typeCell ?? "")) {
        const sdk = CHANNEL_EVENT_FIELDS[type as keyof typeof CHANNEL_EVENT_FIELDS];
        expect(sdk, `event ${type} in the SDK`).toBeDefined();
        expect([...bare(sdk)].sort(), `payload of ${type}`).toEqual(fieldNames(payloadCell ?? "").sort());
      }
    }
  });

  it("channel events: the same event types", () => {
    const documented = table("## Channel events")
      .flatMap(([typeCell]) => names(typeCell ?? ""))
      .sort();
    expect([...CHANNEL_EVENT_TYPES].sort()).toEqual(documented);
  });

  it("close codes: the same codes", () => {
    const documented = table("## Close codes").map(([code]) => Number(code)).sort();
    expect(Object.values(CloseCode).sort()).toEqual(documented);
  });
});
