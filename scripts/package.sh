#!/usr/bin/env bash
# Builds the Debian package (release build) into target/debian/:
#   bash scripts/package.sh
# Install it with: sudo apt install ./target/debian/breakwater_<version>-1_<arch>.deb
# What it holds and how it runs: README ("Install"), [package.metadata.deb] in
# Cargo.toml, packaging/. tests/debian_package_installs_and_runs.rs checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --version 3.6.0 --locked
# Debug line tables go to their own breakwater-dbgsym package (Debian's way): the
# server package stays small, and backtraces get line numbers where it is installed.
cargo deb --locked --dbgsym --compress-debug-symbols=zlib "$@"
