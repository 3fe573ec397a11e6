"""Programs that run on the device side, kept as real files of the package (so they ship in the
wheel, are linted and can be tested here) and read with :mod:`importlib.resources` to be sent.

Each program uses the standard library only (a board or a guest has nothing else before its
runtime is installed), defines ``main(a)`` taking a dict of arguments and prints one JSON object.
:func:`with_call` appends the call with the arguments as a JSON literal in the program text, so
the program goes to ``python3 -`` on ssh's stdin (or to ``python -c``) and no argument ever passes
through a remote shell. A program is self-contained: it cannot import its siblings on the device.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def program(name: str) -> str:
    """The source of ``remote/NAME.py``."""
    return resources.files(__name__).joinpath(f"{name}.py").read_text(encoding="utf-8")


def with_call(name: str, args: dict[str, Any]) -> str:
    """The source of ``remote/NAME.py`` followed by ``main(ARGS)``."""
    return f"{program(name)}\nimport json as _json\nmain(_json.loads({json.dumps(args)!r}))\n"
