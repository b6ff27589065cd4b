"""``python -m flowstate``: the ``flowstate`` command."""

from flowstate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
