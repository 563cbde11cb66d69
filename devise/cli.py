"""The `devise` command line: one sub-command per stage (flags in devise/commands/)."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence

from devise import console
from devise.errors import DeviseError

# Modules that register a sub-command with add_cli(subparsers), in help order. Each must import
# without numpy, torch or Ray (tests/test_cli.py checks): the stage loads when the command runs.
COMMAND_MODULES = (
    "devise.commands.assets",
    "devise.commands.catalog",
    "devise.commands.train",
    "devise.commands.embed",
    "devise.commands.search",
    "devise.commands.serve",
    "devise.commands.index",
    "devise.commands.export",
    "devise.commands.evaluate",
    "devise.commands.demo",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default, unless the default is None/False or the help
    already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
            or not action.option_strings
        ):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})".strip()


def _verbosity_flags(parser: argparse.ArgumentParser, top: bool) -> None:
    # On every sub-command too, so `devise train ... -v` works; SUPPRESS keeps a sub-command's
    # parser from overwriting what was given before the sub-command.
    default = 0 if top else argparse.SUPPRESS
    g = parser.add_argument_group("output")
    g.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=console.VERBOSE,
        default=default,
        help="also show Ray's logs, dependency warnings, worker output and error tracebacks",
    )
    g.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=console.QUIET,
        default=default,
        help="print only results and errors",
    )
    g.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def build_parser(prog: str = "devise", command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `devise`; with command, that sub-command's parser alone under prog (the
    jobs/*.py entry points). Imports only the light modules in COMMAND_MODULES."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Search images by words with a visual-semantic embedding (DeViSE) on Ray.",
        formatter_class=HelpFormatter,
    )
    _verbosity_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    for choice, p in sub.choices.items():
        p.formatter_class = HelpFormatter
        _verbosity_flags(p, top=False)
        if command == choice:
            p.prog = prog
            return p
    if command is not None:
        raise ValueError(f"no sub-command {command!r}")
    return parser


def main(
    argv: Sequence[str] | None = None, prog: str = "devise", command: str | None = None
) -> int:
    """Run `devise` with argv; with command, run that sub-command as the program prog."""
    parser = build_parser(prog, command)
    args = parser.parse_args(argv)
    if command is not None:
        args.command = command
        args.verbosity = getattr(args, "verbosity", console.NORMAL)
    verbose = args.verbosity >= console.VERBOSE or getattr(args, "debug", False)
    console.configure(console.VERBOSE if verbose else args.verbosity)
    name = prog if command else f"{prog} {args.command}"
    said = threading.Event()
    previous = _exit_soon_on_interrupt(name, said)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        said.set()
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (DeviseError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        # A mistake the user can fix: one sentence (-v adds the traceback).
        if verbose:
            traceback.print_exc()
        print(f"{name}: error: {_one_line(e)}", file=sys.stderr)
        return e.EXIT_CODE if isinstance(e, DeviseError) else 2
    finally:
        said.set()  # whatever was to be said is said: a watchdog only ends the process now
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# After a Ctrl-C the command unwinds (locks released, finished work kept) for at most this long,
# then the process exits anyway: a Ctrl-C in a terminal also reaches the Ray processes a stage
# started, and cleanup that waits on them (a gone GCS) would otherwise wait for minutes.
INTERRUPT_GRACE_S = 8.0
_running: dict = {"name": "devise", "said": threading.Event()}


def interrupt_watchdog() -> None:
    """Start (once) the thread that ends the process INTERRUPT_GRACE_S after a Ctrl-C, with one
    line and exit code 130, unless the command has ended by then. Every SIGINT handler of a
    stage calls it (the CLI's own, and Ray Train's wrapper in devise.training)."""
    if any(t.name == "devise-interrupt" for t in threading.enumerate()):
        return
    name, said = _running["name"], _running["said"]

    def watchdog() -> None:
        time.sleep(INTERRUPT_GRACE_S)
        if not said.is_set():
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)

    threading.Thread(target=watchdog, name="devise-interrupt", daemon=True).start()


def _exit_soon_on_interrupt(name: str, said: threading.Event):
    """Make SIGINT raise KeyboardInterrupt as usual and also arm interrupt_watchdog. Returns
    the previous handler (None where signals cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    _running.update(name=name, said=said)

    def on_sigint(signum, frame):
        interrupt_watchdog()
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, on_sigint)
    except ValueError:
        return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # raised by the OS: name the path
        return f"{e.strerror}: {e.filename}"
    return str(e).strip().strip('"') or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
