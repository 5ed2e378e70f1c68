"""`python -m zimage_serve.cli` runs the `zimage` command (used where the console script is not on PATH)."""

from zimage_serve.cli import main

main()
