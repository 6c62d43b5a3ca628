"""``python -m scatter``: the command line."""

from ._cli import main

main()
