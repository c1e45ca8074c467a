// Checks that the committed web/dist is what the current sources build: rebuilds into a
// temporary folder and compares file by file. Exits 1 with the differing files otherwise.
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "./build.mjs";

const webDir = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const dist = join(webDir, "dist");
const tmp = await mkdtemp(join(tmpdir(), "parley-web-dist-"));
try {
  const built = await build(tmp);
  let committed = [];
  try {
    committed = (await readdir(dist, { recursive: true, withFileTypes: true }))
      .filter((e) => e.isFile())
      .map((e) => join(e.parentPath ?? e.path, e.name).slice(dist.length + 1))
      .sort();
  } catch {
    committed = [];
  }
  const problems = [];
  for (const name of new Set([...built, ...committed])) {
    if (!built.includes(name)) problems.push(`${name}: in web/dist but not built from the sources`);
    else if (!committed.includes(name)) problems.push(`${name}: built but missing from web/dist`);
    else {
      const [a, b] = await Promise.all([readFile(join(tmp, name)), readFile(join(dist, name))]);
      if (!a.equals(b)) problems.push(`${name}: differs from a fresh build`);
    }
  }
  if (problems.length > 0) {
    console.error("web/dist is not up to date with the sources (web/src, sdk/js/src):");
    for (const p of problems) console.error(`  ${p}`);
    console.error("Rebuild with `cd web && npm run build` and commit web/dist.");
    process.exit(1);
  }
  console.log(`web/dist is up to date (${built.length} files)`);
} finally {
  await rm(tmp, { recursive: true, force: true });
}
