"""``python -m edgepipe.cli``."""

from edgepipe.cli import main

main()
