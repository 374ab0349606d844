"""``python cli.py ...`` = ``patchdd ...``: a thin shim so that commands run from a checkout without installing."""

from patchdd.cli import main

if __name__ == "__main__":
    main()
