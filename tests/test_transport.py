"""The Fleet transport is gRPC, named where the deployment starts Flower, and the installed Flower has it.

Flower 1.40 dropped the SuperNode's gRPC transport (README, "Flower version"); these checks make a
newer Flower, or a start command that leaves the transport to Flower's default, fail here in seconds
instead of in a deployment that quietly speaks HTTP.
"""

import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

BIN = Path(sys.executable).parent


def _function(script: str, name: str) -> str:
    """The body of shell function ``name`` in ``script``."""
    match = re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", script, re.S | re.M)
    assert match, f"no function {name} in the entry point"
    return match.group(1)


def test_the_entry_point_names_grpc_for_the_superlink_and_the_supernodes():
    script = (ROOT / "deploy" / "entrypoint.sh").read_text()
    assert "--fleet-api-type grpc-rere" in _function(script, "superlink")
    assert re.search(r"[\s(]--grpc-rere\s", _function(script, "supernode"))


def test_the_installed_supernode_can_speak_grpc():
    """`flower-supernode --help` offers --grpc-rere (1.39; 1.40+ refuses it)."""
    result = subprocess.run(
        [str(BIN / "flower-supernode"), "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0 and "--grpc-rere" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
