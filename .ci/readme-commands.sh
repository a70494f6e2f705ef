#!/usr/bin/env bash
# Runs the README's two commands as a new user would on a machine with only
# the Rust toolchain: cargo-nextest is put out of reach, the server command
# must start, serve and stop cleanly, and `cargo test --workspace` (the
# README's answer when nextest is missing) must pass. Run from .ci/run after
# the main test command, so the test build is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

# A PATH and CARGO_HOME from which `cargo nextest` cannot be reached: the
# toolchain's own folder first, then every PATH entry that holds no nextest.
# A folder holding nextest and the system's own tools (sh, cc, python3) stays,
# shadowed by a stand-in that answers like a missing subcommand.
real_home="${CARGO_HOME:-$HOME/.cargo}"
toolchain_bin="$(dirname "$(rustup which cargo)")"
shadow="$(mktemp -d)"
printf '#!/bin/sh\necho "error: no such command: nextest" >&2\nexit 101\n' > "$shadow/cargo-nextest"
chmod +x "$shadow/cargo-nextest"
bare_path="$toolchain_bin"
shadowed=false
IFS=: read -ra path_dirs <<< "$PATH"
for dir in "${path_dirs[@]}"; do
    if [ -z "$dir" ]; then
        continue
    fi
    if [ ! -e "$dir/cargo-nextest" ]; then
        bare_path="$bare_path:$dir"
    elif [ -e "$dir/sh" ]; then
        bare_path="$bare_path:$dir"
        shadowed=true
    fi
done
if $shadowed; then
    bare_path="$shadow:$bare_path"
fi
bare=(env "PATH=$bare_path")
if [ -e "$real_home/bin/cargo-nextest" ]; then
    # cargo also looks in CARGO_HOME/bin; lend it the downloaded crates only.
    bare_home="$(mktemp -d)"
    ln -s "$real_home/registry" "$bare_home/registry"
    if [ -e "$real_home/git" ]; then ln -s "$real_home/git" "$bare_home/git"; fi
    bare+=("CARGO_HOME=$bare_home")
fi
if "${bare[@]}" cargo nextest --version >/dev/null 2>&1; then
    echo "cargo-nextest is still reachable; the toolchain-only check cannot run" >&2
    exit 1
fi
echo "cargo-nextest is out of reach: $("${bare[@]}" cargo nextest --version 2>&1 | head -n 1)"

echo "-- first command: cargo run --release -p trove-server"
created_data=false
if [ ! -e trove-data ]; then created_data=true; fi
"${bare[@]}" cargo run --release -p trove-server >"$root/target/readme-server.log" 2>&1 &
server=$!
stop_server() {
    kill "$server" 2>/dev/null || true
    if $created_data; then rm -rf "$root/trove-data"; fi
}
trap stop_server EXIT
trove="$root/target/debug/trove"
# The release build comes first, so allow for it; the health check, not a
# fixed sleep, says when the server is up.
for _ in $(seq 1 1800); do
    if "$trove" health >/dev/null 2>&1; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then
        cat "$root/target/readme-server.log" >&2
        echo "the server command exited before serving" >&2
        exit 1
    fi
    sleep 1
done
"$trove" health
hash="$(printf 'readme check' | "$trove" -n readme-check objects put -)"
[ "$("$trove" -n readme-check objects get "$hash")" = "readme check" ]
"$trove" -n readme-check objects rm "$hash" >/dev/null
kill -TERM "$server"
if ! wait "$server"; then
    cat "$root/target/readme-server.log" >&2
    echo "the server did not exit cleanly on SIGTERM" >&2
    exit 1
fi
trap - EXIT
if $created_data; then rm -rf "$root/trove-data"; fi
echo "the server command served and stopped cleanly"

echo "-- second command without nextest: cargo test --workspace"
"${bare[@]}" cargo test --workspace
