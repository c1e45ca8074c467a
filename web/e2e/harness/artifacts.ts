/** Where the browser tests leave screenshots and logs: `$PARLEY_ARTIFACTS_DIR` or web/e2e/artifacts. */
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { Page } from "playwright-core";

/** web/ (this file runs from web/e2e/.build/harness after compilation, or web/e2e/harness). */
export const webDir = findWebDir();

function findWebDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!dir.endsWith("/web") && dir !== "/") dir = dirname(dir);
  if (dir === "/") throw new Error("cannot find the web/ folder above the e2e harness");
  return dir;
}

/** The artefact folder of one test, created on first use. */
export function artifactsDir(test: string): string {
  const root = process.env.PARLEY_ARTIFACTS_DIR
    ? resolve(process.env.PARLEY_ARTIFACTS_DIR)
    : join(webDir, "e2e", "artifacts");
  const dir = join(root, test);
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** Saves a full-page screenshot as `<dir>/<step>.png` and returns its path. */
export async function screenshot(page: Page, dir: string, step: string): Promise<string> {
  const path = join(dir, `${step}.png`);
  await page.screenshot({ path, fullPage: true, timeout: 10_000 });
  return path;
}
