// Compiles the browser tests (web/e2e/**/*.ts) into web/e2e/.build, one file each, so that
// `node --test` runs them on Node 20 (type checking is `tsc -p e2e`, separately).
import { readdir, rm } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const e2eDir = resolve(dirname(fileURLToPath(import.meta.url)), "../e2e");
const outDir = join(e2eDir, ".build");
const entries = (await readdir(e2eDir, { recursive: true }))
  .filter((f) => f.endsWith(".ts") && !f.startsWith(".build") && !f.startsWith("artifacts") && !f.startsWith("pages/"))
  .map((f) => join(e2eDir, f));
await rm(outDir, { recursive: true, force: true });
await esbuild.build({
  entryPoints: entries,
  outbase: e2eDir,
  outdir: outDir,
  platform: "node",
  format: "esm",
  target: "node20",
  bundle: false,
  sourcemap: "inline",
  logLevel: "warning",
});
