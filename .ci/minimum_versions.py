"""Prints the declared minimum versions of setup.cfg as pip constraints (``name==version``).

Used by ``.ci/run_minimum`` to install the oldest releases the package claims to support:
every ``name>=version`` requirement of ``install_requires`` becomes ``name==version``;
requirements without a lower bound are left to the resolver.
"""

from __future__ import annotations

import configparser
import pathlib
import re
import sys

SETUP_CFG = pathlib.Path(__file__).resolve().parent.parent / "setup.cfg"
_LOWER_BOUND = re.compile(r"^([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][A-Za-z0-9.]*)$")


def install_requires(path: pathlib.Path = SETUP_CFG) -> list[str]:
    """The ``install_requires`` entries of ``path`` (comments and blank lines dropped)."""
    parser = configparser.ConfigParser()
    parser.read(path)
    lines = parser["options"]["install_requires"].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def minimum_pins(requirements: list[str]) -> dict[str, str]:
    """``{name: version}`` for every requirement with a ``>=`` lower bound."""
    pins = {}
    for requirement in requirements:
        match = _LOWER_BOUND.match(requirement)
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def main() -> None:
    """Prints one ``name==version`` line per lower bound."""
    for name, version in minimum_pins(install_requires()).items():
        sys.stdout.write(f"{name}=={version}\n")


if __name__ == "__main__":
    main()
