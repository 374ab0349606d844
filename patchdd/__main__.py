"""``python -m patchdd ...``: the command line."""

from patchdd.cli import main

main()
