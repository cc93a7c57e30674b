"""Write (or check) the two documents generated from the run-config schema in fedmud/config.py:
``pyproject.toml``'s ``[tool.flwr.app.config]`` (every key at its default) and the README's table
of keys. A key is declared once, on its field (``fedmud.config.key``); run this after adding or
changing one.

    python scripts/config_docs.py          # rewrite both
    python scripts/config_docs.py --check  # exit 1 naming what is stale (tests/test_config.py runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmud.config import markdown_table, toml_table  # noqa: E402

README_BEGIN = "<!-- config keys: written by scripts/config_docs.py from fedmud/config.py; edit the keys there -->\n"
README_END = "<!-- end of config keys -->\n"


def with_readme_table(text: str) -> str:
    """The README with its table of keys (between the markers) as the schema declares it."""
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    return text[:start] + markdown_table() + text[end:]


def with_pyproject_table(text: str) -> str:
    """pyproject.toml with its [tool.flwr.app.config] table (up to the next blank line) as the schema declares it."""
    start = text.index("[tool.flwr.app.config]\n")
    end = text.index("\n\n", start) + 1
    return text[:start] + toml_table() + text[end:]


DOCUMENTS = {"README.md": with_readme_table, "pyproject.toml": with_pyproject_table}


def stale() -> dict[Path, str]:
    """The documents whose generated part differs from the schema, with their new text."""
    out = {}
    for name, render in DOCUMENTS.items():
        path = ROOT / name
        text = path.read_text()
        if render(text) != text:
            out[path] = render(text)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a document is stale")
    args = parser.parse_args()
    changed = stale()
    for path, text in changed.items():
        if args.check:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/config_docs.py", file=sys.stderr)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
