#!/usr/bin/env bash
# The one test command: installs whatever is missing, then runs every check and
# every test (formatting, lints, unit and integration tests against the real
# binary). CI runs exactly this (.ci/run). Safe to run repeatedly: installs are
# skipped when the tool is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is missing; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
export PATH="$HOME/.cargo/bin:$PATH"
# A one-off build (CI) gains nothing from incremental state; it only costs disk.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

log "tools"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked
command -v cargo-deny >/dev/null 2>&1 || cargo install cargo-deny --version 0.20.2 --locked
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --version 3.6.0 --locked
cargo --version
cargo nextest --version | head -n 1

log "backends for the integration tests (real servers, started by the tests on free loopback ports)"
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v clickhouse-server >/dev/null 2>&1 || missing+=(clickhouse-server clickhouse-client)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the WebSocket browser test
command -v promtool >/dev/null 2>&1 || missing+=(prometheus) # dashboards, metrics lint, alert rules
command -v openssl >/dev/null 2>&1 || missing+=(openssl)     # the TLS listener test's certificate
command -v curl >/dev/null 2>&1 || missing+=(curl)           # the TLS listener test's client
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)    # the stalled-disk test (a loop-mounted ext4)
command -v fsfreeze >/dev/null 2>&1 || missing+=(util-linux)  # ... frozen with fsfreeze
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd) # verifies the packaged unit
command -v npm >/dev/null 2>&1 || missing+=(npm)              # the browser SDKs, from npm
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing with apt: ${missing[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
# tansu: a Kafka-protocol broker from crates.io (about 15 minutes to build, once).
command -v tansu >/dev/null 2>&1 || cargo install tansu --version 0.6.0 --locked --features dynostore,libsql
# chdb-core: the current ClickHouse engine in-process, to check our RowBinary and DDL.
venv=target/test-venv
if ! "$venv/bin/python" -c 'import chdb' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "chdb-core==26.9.0"
fi
# Validates openapi.json (tests/openapi_document_matches_the_router.rs).
"$venv/bin/python" -c 'import openapi_spec_validator' >/dev/null 2>&1 \
  || "$venv/bin/pip" install --quiet "openapi-spec-validator==0.7.2"
# Real analytics SDKs from PyPI, one folder each (two releases of one SDK cannot
# share an environment); tests/real_sdks_send_unmodified.rs runs them with python3.
for sdk in segment-analytics-python==2.2.3 segment-analytics-python==2.3.6 \
           segment-analytics-python==2.4.0 rudder-sdk-python==2.1.9; do
  dir="target/sdks/${sdk/==/-}"
  if [ ! -f "$dir/.installed" ]; then
    rm -rf "$dir"
    "$venv/bin/pip" install --quiet --target "$dir" "$sdk"
    touch "$dir/.installed"
  fi
done
# The browser SDKs from npm, bundled for tests/browser_sdks_send_from_another_origin.rs.
bash scripts/browser-sdks.sh
redis-server --version
clickhouse-server --version 2>/dev/null | head -n 1 || true
tansu --version 2>/dev/null || true
chromium --version 2>/dev/null || true
prometheus --version 2>/dev/null | head -n 1 || true
"$venv/bin/python" -c 'import chdb; print("chdb engine", chdb.engine_version)'

log "format"
cargo fmt --all -- --check

log "lint"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

log "supply chain (deny.toml)"
cargo deny --locked check licenses bans sources
log "advisories (RustSec: live database, else the offline snapshot)"
bash scripts/advisories.sh

log "build"
cargo build --workspace --all-targets --all-features --locked
du -sh target/debug 2>/dev/null || true
df -h . | tail -n 1

log "Debian package (tests/debian_package_installs_and_runs.rs)"
bash scripts/package.sh

log "tests"
cargo nextest run --workspace --all-features --locked --no-fail-fast --failure-output final
