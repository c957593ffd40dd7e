#!/usr/bin/env bash
# Fails when proto/ (as in the working tree) cannot be read by a reader built from any
# committed version of it: buf's WIRE_JSON rules (no field renumbered, retyped or
# removed without reservation, no enum value or JSON name changed), checked against every
# commit that changed proto/events.proto, so that a break spread over several commits is
# caught too, and a consumer of any release keeps decoding what it decoded.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=${BUF:-.venv/bin/buf}
revs=$(git log --format=%H -- proto/events.proto 2>/dev/null || true)
[ -n "$revs" ] || { echo "proto-compat: no committed proto to compare with"; exit 0; }
n=0
for rev in $revs; do
  if ! "$buf" breaking proto --against ".git#ref=$rev,depth=1000,subdir=proto"; then
    echo "proto-compat: proto/ breaks readers built from ${rev:0:12} (see above)" >&2
    exit 1
  fi
  n=$((n + 1))
done
echo "proto-compat: proto/ is wire- and JSON-compatible with all $n committed versions"
