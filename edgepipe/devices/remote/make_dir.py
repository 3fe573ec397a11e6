"""On the board: create a folder (and its parents). Arguments: ``d``. Prints ``{}``."""

import os


def main(a):
    os.makedirs(a["d"], exist_ok=True)
    print("{}")
