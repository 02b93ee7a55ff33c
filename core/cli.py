"""`python -m core <command>`: quantize, evaluate, export. User errors print one line and exit 2."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from .commands import COMMANDS
from .errors import FlatQuantError, UsageError, one_line, shown


class CliParser(argparse.ArgumentParser):
    """argparse whose own errors (a bad number or choice, an unknown option, a missing argument or command) are one
    UsageError line instead of a usage block; add_subparsers gives every command's parser this class too."""

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m core", description="FlatQuant Studio: W4A4 post-training quantization "
                       "for LLaMA and Qwen3 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"commands.{name}"):
                continue  # a command whose module is not installed in this checkout
            raise
        module.register(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # a missing command's error names the commands
    return parser


def _check_raw_skip_layers(argv: Sequence[str]) -> None:
    # argparse silently drops a value of '--' (`--skip_layers=--`), so validate the raw text first.
    from .config import normalize_skip_layers

    for arg in argv:
        if arg.startswith("--skip_layers="):
            normalize_skip_layers(arg.split("=", 1)[1], "--skip_layers")


def _path_error(what: str) -> int:
    print(f"error: {one_line(what)}; check the paths given on the command line.", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # A log file on a full disk must not print a traceback block per line; the write that matters (the matrix
    # file, report.json) raises and becomes one error line.
    logging.raiseExceptions = False
    parser = build_parser()
    try:
        _check_raw_skip_layers(argv)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except FlatQuantError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the OS refuses that no check foresaw (name too long, a loop of links, ...)
        where = f" {shown(exc.filename)}" if getattr(exc, "filename", None) else ""
        return _path_error(f"{exc.strerror or type(exc).__name__}:{where}")
    except RuntimeError as exc:
        if not str(exc).startswith("Symlink loop from"):  # pathlib's resolve() on a loop of links (Python < 3.13)
            raise
        return _path_error(str(exc).replace("Symlink loop from", "a loop of symbolic links at"))
    except KeyboardInterrupt:
        print("error: interrupted; finished layers are kept in the resume checkpoint of --output_dir.", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --nsamples, --seqlen or --cali_bsz.", file=sys.stderr)
        return 2
