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

log "tools"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
command -v cargo-nextest >/dev/null 2>&1 || cargo install cargo-nextest --locked
cargo --version
cargo nextest --version | head -n 1

log "format"
cargo fmt --all -- --check

log "lint"
cargo clippy --all-targets --locked -- -D warnings

log "build"
cargo build --all-targets --locked

log "tests"
cargo nextest run --locked --no-fail-fast --failure-output final
