"""Multi-run workflows built on the CLI: teacher x student matrices and the end-to-end demo."""
