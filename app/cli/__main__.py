"""``python -m app.cli``: the same as the ``tracelearn`` command."""

from app.cli import main

main()
