"""Benchmarks: ``python -m dynconv.bench <subcommand> [options]``.

Not timed tests: they print tables (and optionally write JSON) to be recorded in
``docs/performance.md``. Each subcommand is a module of this package with
``main(argv: list[str] | None)``; to add one, add its name and module to ``SUBCOMMANDS``
(modules are imported only when chosen, so a missing optional one does not break the others).
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> module (relative to this package) exposing ``main(argv)``
SUBCOMMANDS: dict[str, str] = {
    "switched": ".switched",
    "condconv": ".condconv",
    "involution": ".involution",
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand's ``main(argv[1:])``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m dynconv.bench <subcommand> [options]")
        print("subcommands:", ", ".join(SUBCOMMANDS))
        print("help for one: python -m dynconv.bench <subcommand> --help")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"unknown subcommand {name!r}; expected one of {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name], __package__)
    return int(module.main(rest) or 0)


__all__ = ["SUBCOMMANDS", "main"]
