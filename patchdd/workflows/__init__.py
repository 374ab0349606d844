"""Multi-run workflows and command runners: ``distill``, teacher x student matrices, the end-to-end demo."""
