"""``python -m dynconv``: the command line (see :mod:`dynconv.cli`); also what
``accelerate launch -m dynconv train CONFIG`` runs on every process."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
