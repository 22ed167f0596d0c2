"""How every command-line entry point fails: one line on stderr and a non-zero exit status.

    TOOL: error: WHAT (the file, record or config key it is about)

A run that stops on bad input, a bad setting or a file it cannot read or write
says so in that one line, instead of a traceback that buries the cause; a genuine
bug (any exception not in `REPORTED`) still raises with its full traceback.

Exit status, one rule for every tool:
  2  the command line or the config is wrong: an unknown flag or config key, a
     config file that does not load, a config value out of range (`ConfigError`),
     a missing argument (`UsageError`, absl's `app.UsageError`);
  1  the run met a problem in its input or its environment: a bad data set or
     record (`ValueError`, among it `RecordError`), a file it cannot read or write
     and a workdir another run holds (`OSError`), and the error types a module
     registers with `@reported` (`CheckpointError`).
A tool may give its own types another status (`run_absl(..., status=...)`:
tools.inspect says 2 for a data set it cannot read at all).

`--debug` (or the environment variable RINGMOE_DEBUG=1) turns this off: the error
raises with its full traceback.

    if __name__ == "__main__":                    # every tool: absl flags, ml_collections configs
        cli.run_absl("pretrain.train", main)      # replaces app.run(main); defines --debug

Only the standard library and absl are imported here, so a command-line mistake
is reported before any heavy import.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys

from absl import app, flags

DEBUG_ENV = "RINGMOE_DEBUG"


class UsageError(Exception):
    """A missing or contradictory command-line argument (exit status 2)."""


class ConfigError(ValueError):
    """A config value the run cannot use; the message names the key (exit status 2)."""


# Exception type -> exit status. The most specific registered class of an error
# (the first in its MRO) decides; anything unregistered is a bug and keeps its traceback.
REPORTED: dict[type, int] = {
    UsageError: 2,
    app.UsageError: 2,
    ConfigError: 2,
    OSError: 1,
    ValueError: 1,
}


def reported(cls=None, *, status: int = 1):
    """Class decorator: errors of this type are reported as one line with `status`.
    For a module's own error types that are not ValueError or OSError (CheckpointError)."""
    def register(c):
        REPORTED[c] = status
        return c
    return register if cls is None else register(cls)


def debug_requested(argv=()) -> bool:
    """--debug among `argv`, or RINGMOE_DEBUG set to anything but '', '0' or 'false'."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false")


def describe(error: BaseException) -> str:
    """The one-line text of an error: an OSError as 'PATH: reason', others their message
    (a KeyError's without the quotes str() adds); multi-line messages keep their first
    and last lines."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = os.fsdecode(error.filename)
        if error.filename2 is not None:
            where += f" -> {os.fsdecode(error.filename2)}"
        text = f"{where}: {error.strerror}"
    elif len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error) or type(error).__name__
    return one_line(text)


def one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}"


def status_of(error: BaseException, overrides: dict[type, int] | None = None) -> int | None:
    """The exit status `error` is reported with, or None (a bug: let it raise)."""
    table = {**REPORTED, **(overrides or {})}
    return next((table[c] for c in type(error).__mro__ if c in table), None)


def fail(tool: str, status: int, text: str):
    """Prints 'TOOL: error: TEXT' to stderr and exits with `status`."""
    sys.stdout.flush()
    print(f"{tool}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(status)


@contextlib.contextmanager
def errors(tool: str, *, debug: bool = False, status: dict[type, int] | None = None):
    """Reports a reported error (module doc) raised inside as one line and exits; others,
    and every error when `debug`, raise unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 -- filtered by status_of; the rest re-raises
        code = status_of(e, status)
        if code is None or debug or debug_requested():
            raise
        fail(tool, code, describe(e))


# --- absl tools ---------------------------------------------------------------------------

def setup_logging(level: int = logging.INFO, absl_level: int = logging.WARNING) -> None:
    """The one logging set-up of every tool: progress from `ringmoe` loggers at `level`, other
    libraries' warnings, absl's (Orbax logs every file it writes at INFO) from `absl_level` up."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(absl_level)
    logging.getLogger("ringmoe").setLevel(level)


def no_arguments(argv: list[str]) -> None:
    """A UsageError for positional arguments left after the flags (a flag's value given
    without its flag, a typo), which absl would otherwise pass over in silence."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def run_absl(tool: str, main, *, required: tuple[str, ...] = (),
             status: dict[type, int] | None = None) -> None:
    """`app.run(main)` for an absl tool: flags (and ml_collections config flags) parsed by
    `parse_flags`, the `required` ones marked so (absl checks them as it parses: one line
    '--a, --b required', status 2), `main` run under `errors(tool)`, and a --debug flag."""
    flags.mark_flags_as_required(list(required))
    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, f"On an error, raise with the full traceback ({DEBUG_ENV}=1 too).")

    def guarded(argv):
        with errors(tool, debug=flags.FLAGS.debug, status=status):
            return main(argv)
    app.run(guarded, flags_parser=functools.partial(parse_flags, tool))


def define_config_dict(tool: str, name: str, default, help_text: str):
    """`config_flags.DEFINE_config_dict`, whose overrides are parsed from sys.argv as the flag is
    defined (not when `run_absl` parses the flags): an override of a key `default` lacks is the
    same one-line usage error (status 2) as everywhere else."""
    from ml_collections import config_flags
    return _defined_early(tool, config_flags.DEFINE_config_dict, name, default, help_text)


def define_config_file(tool: str, name: str, default: str, help_text: str):
    """`config_flags.DEFINE_config_file` with a default file: like a config dict, its overrides
    are parsed as the flag is defined, with the same one-line usage error."""
    from ml_collections import config_flags
    return _defined_early(tool, config_flags.DEFINE_config_file, name, default, help_text)


def _defined_early(tool: str, define, name: str, default, help_text: str):
    try:
        return define(name, default, help_text)
    except (AttributeError, KeyError) as e:
        if debug_requested(sys.argv):
            raise
        problem = unknown_override(sys.argv, e)
        if problem is None:
            raise
        fail(tool, 2, problem)


_REQUIRED_MISSING = re.compile(r"Flag (--[\w.-]+) must have a value other than None")


def parse_flags(tool: str, argv: list[str]) -> list[str]:
    """flags.FLAGS(argv), with every parse problem one line and exit status 2: an unknown or
    malformed flag, an override of a key the config lacks (ml_collections raises AttributeError
    or KeyError for `--config.nonexistent=1`), a config file that does not load (OSError, at
    once or at the first use of the config). Under --debug, parsed as absl would."""
    if debug_requested(argv):
        return flags.FLAGS(argv)
    try:
        rest = flags.FLAGS(argv)
        problem = next(filter(None, (unloadable_config(name, argv) for name in list(flags.FLAGS))), None)
    except flags.Error as e:
        missing = _REQUIRED_MISSING.findall(str(e))
        problem = f"{', '.join(missing)} required" if missing else one_line(str(e))
    except (AttributeError, KeyError) as e:
        problem = unknown_override(argv, e)
        if problem is None:
            raise
    except OSError as e:  # an override of a config whose file did not load
        problem = config_load_problem(argv, e)
        if problem is None:
            raise
    if problem is not None:
        fail(tool, 2, problem)
    return rest


def unknown_override(argv: list[str], error: Exception) -> str | None:
    """'--config.x=1: config has no key 'x'' for the override the error is about, or None when
    no override on the command line names the missing key (then it is not a usage error)."""
    inner = error
    while inner.args and isinstance(inner.args[0], BaseException):
        inner = inner.args[0]
    text = str(inner.args[0]) if inner.args else str(inner)
    first, *hint = text.splitlines()
    key = first.strip().strip("'\"")
    for arg in argv:
        match = re.match(r"^--?(?:no)?([\w-]+)\.([\w.]+)(=.*)?$", arg)
        if match and key in match.group(2).split("."):
            suggestion = re.search(r'Did you mean "([^"]+)"', " ".join(hint))
            return (f"{arg}: the config has no key {match.group(2)!r}"
                    + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""))
    return None


def unloadable_config(name: str, argv: list[str]) -> str | None:
    """The problem of an ml_collections config flag whose file did not load (config_flags
    defers that error to the first use of the config), or None."""
    value = flags.FLAGS[name].value
    if value is None:
        return None
    try:
        getattr(value, "keys", None)  # a config that failed to load raises OSError on any use
        return None
    except OSError as e:
        return config_load_problem(argv, e, name)


def config_load_problem(argv: list[str], error: OSError, name: str | None = None) -> str | None:
    """'--NAME=PATH: no such config file' (or the loader's reason) for config_flags' error
    'Failed loading config file NAME_config ...'; None for any other OSError."""
    found = re.search(r"Failed loading config file (\S+)_config", str(error))
    if found is None:
        return None
    name = name or found.group(1)
    path = flag_argument(name, argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        return f"--{name}={path}: no such config file"
    return f"--{name}={path}: cannot load the config file ({one_line(str(error)).split(' ... ')[-1]})"


def flag_argument(name: str, argv: list[str]) -> str | None:
    """The value given to --NAME on the command line (--NAME=V or --NAME V), or None."""
    for i, arg in enumerate(argv):
        if re.match(rf"^--?{re.escape(name)}=", arg):
            return arg.split("=", 1)[1]
        if re.match(rf"^--?{re.escape(name)}$", arg) and i + 1 < len(argv):
            return argv[i + 1]
    return None
