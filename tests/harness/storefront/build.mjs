#!/usr/bin/env node
// Bundles @depict-ai/dpc (+ @depict-ai/utilishared) UNCHANGED into one IIFE
// for page.html. Only `process.env.*` references are replaced (esbuild define).
//
//   node build.mjs --base-url http://127.0.0.1:8000 [--outfile dist/dpc.bundle.js] [--debug]
//
// --base-url is the bridge origin: the client posts beacons to
// `${BASE_URL}/create-events` (and purchases to `${BASE_URL}/v2/create-events`).
// The WebSocket URL is hard-coded in utilishared (wss://ws.depict.ai/ws/create-events)
// and cannot be changed by a define: route that host in the browser instead
// (see NOTES.md, Chromium --host-resolver-rules).
import { build } from "esbuild";
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: {
    "base-url": { type: "string" },
    outfile: { type: "string", default: path.join(here, "dist", "dpc.bundle.js") },
    debug: { type: "boolean", default: false },
  },
});
const baseUrl = values["base-url"] ?? process.env.BRIDGE_URL;
if (!baseUrl || !/^https?:\/\/[^/]+$/.test(baseUrl)) {
  console.error("usage: node build.mjs --base-url http://HOST:PORT   (an origin, no path, no trailing slash)");
  process.exit(2);
}

// Every process.env.* that dpc 1.0.45 / utilishared 1.0.51 read (grep of both builds).
// Unset ones must still be replaced: a browser has no `process`.
const env = {
  BASE_URL: baseUrl,          // beacon / fetch base (default https://api.depict.ai)
  DEBUG: values.debug ? "true" : "false", // "true": console logging of every send/reply
  NODE_ENV: "production",
  BUILD_TARGET: "modern",     // not "node" (browser paths), "modern" skips IE Proxy polyfill paths
  DEPICT: "true",             // "false" turns every send into a no-op
  SENTRY: "false",            // no lazy Sentry <script> from cdn.depict.ai on errors
  DEPICT_ERROR_REPORTING: "false",
  NEXT_PUBLIC_DEPICT_ERROR_REPORTING: "false",
  GA: "false",
  GTAG: "false",
  GTAG_VIEW: "false",
  STRIP_DEBUG: undefined,
  TENANT: undefined,          // only used by other utilishared features (and Sentry env)
  ORIG_URL: undefined,
  CONSENT_FRAMEWORK: undefined,
  OPTANON_KEYS: undefined,
  DEPICT_TRACKING_CONSENT_LEVEL: undefined,
  GTAG_EVENT_CONSENT_LEVEL: undefined,
  GTAG_LOADING_CONSENT_LEVEL: undefined,
  SENTRY_SAMPLE_RATE: undefined,
  sentry_version: undefined,
};
const define = Object.fromEntries(
  Object.entries(env).map(([k, v]) => [`process.env.${k}`, v === undefined ? "undefined" : JSON.stringify(v)]),
);

const result = await build({
  entryPoints: [path.join(here, "entry.js")],
  outfile: values.outfile,
  bundle: true,
  format: "iife",
  platform: "browser",
  target: "chrome110",
  minify: false,
  sourcemap: false,
  define,
  logLevel: "warning",
  metafile: true,
});
// Fail loudly if any process.env reference survived (would throw ReferenceError in the page).
const { readFileSync } = await import("node:fs");
const out = readFileSync(values.outfile, "utf8");
const left = out.match(/process\.env\.[A-Za-z_]+/g);
if (left) {
  console.error("unreplaced:", [...new Set(left)].join(", "));
  process.exit(1);
}
console.log(`built ${path.relative(process.cwd(), values.outfile)} (${out.length} bytes), BASE_URL=${baseUrl}`);
