// Bundles src/ into static/ (app.js, app.css) with esbuild, and writes the licenses of the bundled packages.
// static/index.html is written by hand: it is the page, and loads the bundle.
import { build } from "esbuild";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";

const BUNDLED = ["marked", "dompurify", "highlight.js"];

mkdirSync("static", { recursive: true });
await build({
  entryPoints: ["src/app.js", "src/app.css"],
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  outdir: "static",
  legalComments: "none",
  logLevel: "warning",
});
const licenses = BUNDLED.map((name) => {
  const manifest = JSON.parse(readFileSync(`node_modules/${name}/package.json`, "utf8"));
  const file = readdirSync(`node_modules/${name}`).find((entry) => /^licen[cs]e/i.test(entry));
  const text = readFileSync(`node_modules/${name}/${file}`, "utf8");
  return `${name} ${manifest.version} (${manifest.license})\n\n${text.trim()}\n`;
});
writeFileSync("static/THIRD_PARTY_LICENSES.txt", licenses.join("\n" + "-".repeat(72) + "\n\n"));
