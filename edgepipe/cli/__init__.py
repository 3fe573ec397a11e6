"""The command line: a thin click layer over the Python API. The only module (with the device entry
point, ``python -m edgepipe.runtime``) that prints. One command maps to one public function; the
commands live by theme in ``build_cmds``, ``artifact_cmds``, ``ship_cmds`` and ``tool_cmds``."""

from __future__ import annotations

import logging

import click

from edgepipe.cli._common import _native_stdout_to_stderr, _on_sigterm

__all__ = ["main", "_native_stdout_to_stderr"]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log details to stderr.")
@click.version_option(package_name="edgepipe")
def main(verbose: bool) -> None:
    """edgepipe: build, verify and run quantized LLM artifacts for edge devices."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


from edgepipe.cli import artifact_cmds, build_cmds, ship_cmds, tool_cmds  # noqa: E402,F401  (register the commands)
