#!/usr/bin/env bash
# The RustSec advisory check of Cargo.lock (cargo-deny, deny.toml [advisories]).
#
# Which database: the live one when it can be fetched from github.com; otherwise the
# offline snapshot in ../shared/advisory-db/ (or $BREAKWATER_ADVISORY_DB), turned into
# the git repository cargo-deny expects under target/advisory-db/. It says which one
# it used and how old it is. Any advisory not ignored (with its reason) in deny.toml
# fails the check. With neither database at hand it says so loudly, and fails when
# BREAKWATER_REQUIRE_ADVISORIES=1.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deny names its database directory after the hash of the database's URL.
db_dir_name="advisory-db-3157b0e258782691"

if cargo deny --locked fetch db >/dev/null 2>&1; then
  live="$HOME/.cargo/advisory-dbs/$db_dir_name"
  echo "advisories: live RustSec database, last commit $(git -C "$live" log -1 --format=%cs 2>/dev/null || echo unknown)"
  exec cargo deny --locked check advisories
fi

snapshot="${BREAKWATER_ADVISORY_DB:-../shared/advisory-db}"
if [ ! -f "$snapshot/SNAPSHOT.md" ] || [ ! -d "$snapshot/crates" ]; then
  echo "########################################################################" >&2
  echo "# ADVISORY CHECK NOT RUN: the RustSec database (github.com) is unreachable" >&2
  echo "# and no offline snapshot was found at $snapshot (BREAKWATER_ADVISORY_DB)." >&2
  echo "########################################################################" >&2
  [ "${BREAKWATER_REQUIRE_ADVISORIES:-0}" = 1 ] && exit 1
  exit 0
fi

# The snapshot's commit and date, as SNAPSHOT.md states them.
commit=$(grep -o '[0-9a-f]\{40\}' "$snapshot/SNAPSHOT.md" | head -n 1)
date=$(grep -o 'of [0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\}' "$snapshot/SNAPSHOT.md" | head -n 1 | cut -c4-)
root="$PWD/target/advisory-db"
db="$root/$db_dir_name"
if [ "$(cat "$root/.snapshot" 2>/dev/null)" != "$commit" ]; then
  rm -rf "$root" && mkdir -p "$db"
  cp -r "$snapshot/." "$db"
  (
    cd "$db" && git init -q && git add -A &&
      GIT_COMMITTER_DATE="${date}T00:00:00Z" git -c user.name=snapshot -c user.email=snapshot@localhost \
        commit -q -m "snapshot $commit" --date "${date}T00:00:00Z"
  )
  echo "$commit" >"$root/.snapshot"
fi
# deny.toml with db-path pointing at the snapshot; everything else as checked in.
config="$root/deny.toml"
awk -v path="$root" '{ print } /^\[advisories\]/ { print "db-path = \"" path "\"" }' deny.toml >"$config"
echo "advisories: offline RustSec snapshot of $date (commit $commit, $snapshot): advisories published after that date are not checked"
exec cargo deny --frozen --config "$config" check advisories
