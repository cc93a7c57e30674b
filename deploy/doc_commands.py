"""The command blocks of docs/deployment.md, for the smoke scripts: what the docs show is what runs.

A block is a fenced code block right after a marker line ``<!-- cmd: NAME -->`` (invisible in the
rendered page). The smoke scripts run these blocks as written, in a scratch copy of the project;
where a test host cannot use the docs' text (a second client host, two rounds instead of ten)
they replace exact strings, and every replacement must match, so that a changed block fails the
smoke test instead of silently testing something else.

    python3 deploy/doc_commands.py NAME [--sub OLD NEW ...] [--docs docs/deployment.md]
    python3 deploy/doc_commands.py --list

Prints the block (with substitutions) on stdout; exit status 1 when the block or a substitution's
OLD text is missing. Standard library only (runs with any python3 >= 3.8).
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
MARKER = re.compile(r"^\s*<!--\s*cmd:\s*([\w.-]+)\s*-->\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)")


def blocks(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = MARKER.match(lines[i])
        i += 1
        if not match:
            continue
        name = match.group(1)
        while i < len(lines) and not lines[i].strip():
            i += 1
        opening = FENCE.match(lines[i]) if i < len(lines) else None
        if not opening:
            raise SystemExit(f"docs: the marker for {name!r} is not followed by a fenced block")
        fence, body = opening.group(1), []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1
        if name in found:
            raise SystemExit(f"docs: block {name!r} is marked twice")
        found[name] = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?")
    parser.add_argument("--sub", nargs=2, action="append", default=[], metavar=("OLD", "NEW"))
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    found = blocks(args.docs.read_text())
    if args.list or not args.name:
        print("\n".join(found))
        return 0
    if args.name not in found:
        print(f"doc_commands: no block {args.name!r} in {args.docs} (have: {', '.join(found)})", file=sys.stderr)
        return 1
    block = found[args.name]
    for old, new in args.sub:
        if old not in block:
            print(f"doc_commands: block {args.name!r} no longer contains {old!r}; update the smoke script", file=sys.stderr)
            return 1
        block = block.replace(old, new)
    sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
