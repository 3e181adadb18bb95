"""Tools beside the core, which nothing in it imports; run from the repository root: python -m tools.bench."""
