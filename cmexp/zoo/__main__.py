"""``python -m cmexp.zoo``: list the shipped models and check their SHA-256 (exit 1 if any
file is missing or corrupt)."""

from __future__ import annotations

import sys

from cmexp import zoo


def main() -> int:
    bad = 0
    for name in zoo.names():
        entry = zoo.info(name)
        try:
            path = zoo.resolve(f"zoo:{name}", key="zoo")
            status = f"ok  {path.stat().st_size / 1e6:.2f} MB  sha256 {entry['sha256'][:12]}"
        except (OSError, ValueError) as err:
            status, bad = f"BAD {err}", bad + 1
        print(f"zoo:{name:<20} {entry['kind']:<11} {status}\n    {entry['description']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
