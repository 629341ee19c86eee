"""``python -m app.cli``: the same as the ``tracelearn`` command."""

from app.cli import main

# Guarded: a spawned process (the ingest helpers) imports the main module of its parent.
if __name__ == "__main__":
    main()
