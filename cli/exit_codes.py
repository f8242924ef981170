"""Documented exit codes of sd3plugin-cache (also in docs/cache.md)."""
EXIT = {
    "ok": 0,
    "error": 1,            # anything unexpected
    "usage": 2,            # bad arguments / config (same as argparse and sd3plugin-run)
    "incompatible": 3,     # archive manifest does not match this machine (use --force)
    "corrupt": 4,          # checksum mismatch, truncated or unsafe archive (never overridable)
    "compiled": 5,         # verify: the warm start had to compile
    "not_found": 6,        # cache or archive not found
    "locked": 7,           # cache dir locked by another process (timeout)
    "cannot_write": 8,     # no permission, read-only target, disk full
    "untrusted": 9,        # a trusted key is set and the archive is unsigned or wrongly signed
    "interrupted": 130,    # Ctrl-C (SIGINT): one line, nothing half-written left unmarked
}
