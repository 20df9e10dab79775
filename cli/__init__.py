"""tokenpool.cli: the `tokenpool` command line (see cli/main.py)."""
