"""Command-line entry points: `loop-ray <command>` (`main`), one module per command where the
command has its own parsing."""
