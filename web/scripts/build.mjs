// Builds the web client into the folder given as the first argument (default: dist).
//
// The output is deterministic: the same sources give byte-identical files, whichever folder the
// build writes to, so `scripts/check-dist.mjs` can rebuild into a temporary folder and compare.
// The SDK is bundled from its TypeScript sources (sdk/js/src), so building the web client never
// needs a build of the SDK first.
import { createHash } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";
import { faviconIco } from "./favicon.mjs";

const webDir = resolve(dirname(fileURLToPath(import.meta.url)), "..");
/**
 * The SDK sources to bundle. $PARLEY_SDK_SRC points elsewhere, e.g. at `src` in an export of the
 * committed sdk/js while the working tree holds unfinished SDK changes. The export needs the
 * SDK's package.json and tsconfig.json beside `src`: esbuild reads them (`sideEffects`, class
 * field semantics), so they change the output. The output names no paths.
 */
const sdkSrc = resolve(process.env.PARLEY_SDK_SRC ?? join(webDir, "../sdk/js/src"));

/** Builds into `outDir` and returns the names of the files written. */
export async function build(outDir) {
  const out = resolve(webDir, outDir);
  await rm(out, { recursive: true, force: true });
  await mkdir(out, { recursive: true });

  const result = await esbuild.build({
    absWorkingDir: webDir,
    entryPoints: { app: "src/main.ts" },
    bundle: true,
    write: false,
    format: "esm",
    platform: "browser",
    target: ["es2022"],
    charset: "utf8",
    legalComments: "none",
    minify: true,
    sourcemap: false,
    outdir: out,
    alias: { "@parley/sdk": join(sdkSrc, "index.ts") },
    logLevel: "warning",
  });
  const files = new Map();
  for (const file of result.outputFiles) {
    files.set(file.path.slice(out.length + 1), file.contents);
  }
  const css = await esbuild.build({
    absWorkingDir: webDir,
    entryPoints: { app: "src/styles.css" },
    bundle: true,
    write: false,
    minify: true,
    charset: "utf8",
    outdir: out,
    logLevel: "warning",
  });
  for (const file of css.outputFiles) {
    files.set(file.path.slice(out.length + 1), file.contents);
  }

  // index.html names the bundles with a content hash in the query, so a browser never runs a
  // new page against a cached old script.
  let html = await readFile(join(webDir, "src/index.html"), "utf8");
  for (const name of ["app.js", "app.css"]) {
    const body = files.get(name);
    if (!body) throw new Error(`build produced no ${name}`);
    const hash = createHash("sha256").update(body).digest("hex").slice(0, 12);
    html = html.replaceAll(`/${name}"`, `/${name}?v=${hash}"`);
  }
  files.set("index.html", new TextEncoder().encode(html));
  // The icon: SVG for browsers that read index.html's <link>, ICO at /favicon.ico for the rest.
  files.set("favicon.svg", await readFile(join(webDir, "src/favicon.svg")));
  files.set("favicon.ico", faviconIco());

  for (const [name, body] of files) {
    await mkdir(dirname(join(out, name)), { recursive: true });
    await writeFile(join(out, name), body);
  }
  return [...files.keys()].sort();
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const outDir = process.argv[2] ?? "dist";
  const names = await build(outDir);
  console.log(`built ${names.join(", ")} into ${outDir}`);
}
