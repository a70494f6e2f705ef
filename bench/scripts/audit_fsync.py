"""Checks from an strace of trove-server that every gRPC reply followed a
completed fdatasync/fsync of the write-ahead log.

Record the trace with
    strace -f -tt -y -e trace=fdatasync,fsync,sync_file_range,writev \
        -o trace.txt target/release/trove-server --data-dir DIR
drive sequential writes at it (one call at a time), stop it, then run
    python3 bench/scripts/audit_fsync.py trace.txt
A reply is a socket write that starts with an HTTP/2 HEADERS frame carrying
END_HEADERS (type 1, flags 4). With one call in flight at a time, every
reply must have a completed log sync since the previous one.
"""
import re
import sys


def events(path):
    unfinished = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = re.match(r"(\d+)\s+(\S+)\s+(.*)", line)
        if not m:
            continue
        pid, _, rest = m.groups()
        if rest.startswith(("fdatasync(", "fsync(")):
            target = re.search(r"<([^>]*)>", rest)
            name = target.group(1) if target else "?"
            if "unfinished" in rest:
                unfinished[pid] = name
            else:
                yield "sync", name
        elif rest.startswith(("<... fdatasync resumed>", "<... fsync resumed>")):
            yield "sync", unfinished.pop(pid, "?")
        elif re.match(r"writev\(\d+<socket", rest) and "\\1\\4\\0\\0\\0" in rest[:80]:
            yield "reply", rest[:50]


def main():
    synced = False
    covered = uncovered = 0
    for kind, what in events(sys.argv[1]):
        if kind == "sync" and what.endswith(".wal"):
            synced = True
        elif kind == "reply":
            if synced:
                covered += 1
            else:
                uncovered += 1
            synced = False
    print(f"replies: {covered + uncovered}; after a completed log fdatasync: {covered}; not: {uncovered}")
    return 1 if uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
