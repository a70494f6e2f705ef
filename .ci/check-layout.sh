#!/usr/bin/env bash
# Checks the layout rules of the server crate (see server/src/engine/mod.rs):
# the two engines never import each other, engines never touch tonic, gRPC
# adapters import nothing of the server but each other, the contract crate
# knows no storage engine; and across the source, every file opens with a
# `//!` comment and no file holds more than 600 lines before its tests.
# Prints every breach and exits 1 if there was one.
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
breach() {
    echo "layout: $*" >&2
    failed=1
}

# Code lines only: comment lines never count as imports.
code() {
    grep -vE '^\s*//' "$1" || true
}

# forbid FOLDER PATTERN WHY: no code line under FOLDER matches PATTERN.
forbid() {
    local folder=$1 pattern=$2 why=$3 file
    while IFS= read -r file; do
        if code "$file" | grep -qE "$pattern"; then
            breach "$file: $why ($(code "$file" | grep -nE "$pattern" | head -n 1))"
        fi
    done < <(find "$folder" -name '*.rs' | sort)
}

forbid server/src/engine/sled 'engine::bucket|super::super::bucket' \
    "the sled engine must not import the bucket engine"
forbid server/src/engine/bucket 'engine::sled|super::super::sled' \
    "the bucket engine must not import the sled engine"
forbid server/src/engine '\btonic\b' "engines know nothing of tonic"
forbid server/src/grpc 'crate::' "gRPC adapters import only trove-proto (and each other)"
forbid server/src/grpc '\b(sled|object_store)\b' "gRPC adapters know no storage engine"
forbid proto/src '\b(sled|object_store)::' "the contract knows no storage engine"

# Every source file says what it owns; none is over 600 lines before its
# unit tests (test code is exempt from the length rule: the test crate, test
# folders and test-only files).
while IFS= read -r file; do
    if ! head -n 1 "$file" | grep -q '^//!'; then
        breach "$file: does not open with a //! comment saying what it owns"
    fi
    case "$file" in
        tests/* | */tests/* | */tests.rs) continue ;;
    esac
    lines=$(awk '/^#\[cfg\(test\)\]/ { exit } { n++ } END { print n + 0 }' "$file")
    if [ "$lines" -gt 600 ]; then
        breach "$file: $lines lines before its tests; split it (at most 600)"
    fi
done < <(find proto/src server/src client/src cli/src bench/src tests/src -name '*.rs' | sort)

if [ "$failed" -ne 0 ]; then
    exit 1
fi
echo "layout rules hold"
