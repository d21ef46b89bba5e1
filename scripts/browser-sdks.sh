#!/usr/bin/env bash
# Installs the browser SDKs pinned in tests/browser/package.json from npm and bundles
# them (esbuild) into target/browser-sdks/sdks.js for
# tests/browser_sdks_send_from_another_origin.rs. Skipped when the bundle is there
# and package.json has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/browser-sdks
if [ -f "$out/sdks.js" ] && cmp -s tests/browser/package.json "$out/package.json"; then
  echo "browser SDKs: bundle up to date ($out/sdks.js)"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "npm is needed to install the browser SDKs (Node 20)" >&2; exit 1; }
mkdir -p "$out"
cp tests/browser/package.json tests/browser/entry.mjs "$out/"
(cd "$out" && npm install --no-audit --no-fund --loglevel=error \
  && ./node_modules/.bin/esbuild entry.mjs --bundle --format=iife --target=chrome100 --outfile=sdks.js)
echo "browser SDKs: bundled into $out/sdks.js"
