"""What every script shares: the parser built from an options dataclass, `--config` files, `run_main`.

transformers' HfArgumentParser builds parsers from dataclasses too, but it doubles every flag with an
underscore spelling, shows booleans as `--flag [FLAG]`, and has no positional arguments or deprecated
spellings; this builder keeps the same idea (one declaration per option) with the command lines our
users already type.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Type, TypeVar

from .errors import ChatkitError, Terminated
from .optionspec import flag_name, problems

T = TypeVar("T")
FLAG_SUFFIX = "__flag"  # dest of the --NAME spelling of a positional argument


def _base_type(hint):
    """(element type, is a list) for Optional[X], List[X] and plain X."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) in (list, List):
        return typing.get_args(hint)[0], True
    return hint, False


def _group_of(cls: type, name: str) -> Optional[str]:
    """The title of the shared group that declares field `name`, or None for the script's own fields."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}) and klass is not cls:
            owner = klass
            break
    else:
        return None
    return getattr(owner, "__group__", None)


class _Deprecated(argparse.Action):
    """An old spelling: stores the value and remembers to say what the new spelling is."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values if values is not None else self.const)
        notes = getattr(namespace, "_deprecated", [])
        notes.append(f"note: {option_string} is now {flag_name(self.dest)}; the old spelling will be removed")
        namespace._deprecated = notes


def _add_field(target, item: dataclasses.Field, hint) -> None:
    meta = item.metadata
    kind, many = _base_type(hint)
    kwargs: Dict[str, object] = {"help": meta.get("help") or None}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    default = item.default if item.default is not dataclasses.MISSING else None
    if kind is bool:  # a default of None (choose) or True can be turned off with --no-NAME
        kwargs["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        kwargs["default"] = default
    else:
        kwargs.update(type=kind, default=default)
        if many:
            kwargs["nargs"] = meta.get("nargs") or "+"
        elif meta.get("nargs"):
            kwargs.update(nargs=meta["nargs"], const=meta.get("const"))
    if meta.get("positional"):
        target.add_argument(item.name, **kwargs)
        if meta.get("flags"):
            extra = dict(kwargs, dest=item.name + FLAG_SUFFIX, default=None, help="the same as " +
                         (meta.get("metavar") or item.name.upper()))
            extra.pop("nargs", None)
            target.add_argument(*meta["flags"], **extra)
        return
    target.add_argument(flag_name(item.name), *meta.get("flags", ()), dest=item.name, **kwargs)
    for old in meta.get("deprecated", ()):
        old_kwargs = {k: v for k, v in kwargs.items() if k not in ("action", "help", "default")}
        if kind is bool:
            old_kwargs.update(nargs=0, const=True)
        target.add_argument(old, dest=item.name, action=_Deprecated, help=argparse.SUPPRESS,
                            default=argparse.SUPPRESS, **old_kwargs)


def make_parser(cls: type, doc: str) -> argparse.ArgumentParser:
    """The argparse parser for an options dataclass; `doc` is the script's docstring (summary, then examples)."""
    summary, _, epilog = doc.partition("\n\n")
    parser = argparse.ArgumentParser(description=summary, epilog=epilog or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if getattr(cls, "__config__", False):
        parser.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of these options "
                                                              "(flags override it)")
    hints = typing.get_type_hints(cls)
    groups: Dict[Optional[str], object] = {None: parser}
    for item in dataclasses.fields(cls):
        title = _group_of(cls, item.name)
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add_field(groups[title], item, hints[item.name])
    return parser


def read_config(path: str, cls: type) -> dict:
    """Options from a YAML/JSON file, keys spelled like the flags (dashes or underscores)."""
    file = Path(path)
    if not file.is_file():
        raise ChatkitError(f"--config {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChatkitError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # YAML and JSON errors alike: the file is not readable as options
        raise ChatkitError(f"--config {path}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ChatkitError(f"--config {path}: expected a mapping of option names to values")
    hints = typing.get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    config = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ChatkitError(f"--config {path}: unknown option {key!r}")
        kind, many = _base_type(hints[name])
        if many and isinstance(value, str):
            value = [value]
        elif many and value is not None and (not isinstance(value, list) or not all(
                isinstance(item, kind) and not isinstance(item, bool) for item in value)):
            raise ChatkitError(f"--config {path}: {key} should be a {kind.__name__} or a list of them, not {value!r}")
        elif value is not None and not many and (not isinstance(value, kind) or (isinstance(value, bool) and kind
                                                                                 is not bool)) and not (
                kind is float and isinstance(value, int) and not isinstance(value, bool)):
            raise ChatkitError(f"--config {path}: {key} should be {kind.__name__}, not {value!r}")
        config[name] = value
    return config


def parse(cls: Type[T], doc: str, argv: Optional[Sequence[str]] = None) -> T:
    """Parse a command line (and its --config file) into the options dataclass; usage errors exit 2."""
    parser = make_parser(cls, doc)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        parser.set_defaults(**read_config(args.config, cls))
        args = parser.parse_args(argv)
    values = vars(args)
    for note in values.pop("_deprecated", []):
        print(note, file=sys.stderr)
    values.pop("config", None)
    for name in [key for key in values if key.endswith(FLAG_SUFFIX)]:
        flagged, base = values.pop(name), name[: -len(FLAG_SUFFIX)]
        if flagged is not None and values.get(base) is not None:
            parser.error(f"give {base} once: as {base.upper()} or as --{base}")
        values[base] = values[base] if values.get(base) is not None else flagged
    missing = [flag_name(item.name) for item in dataclasses.fields(cls)
               if item.metadata.get("required") and not values.get(item.name)]
    if missing:
        where = " (here or in --config)" if getattr(cls, "__config__", False) else ""
        parser.error(f"{', '.join(missing)} is required{where}")
    options = cls(**values)
    found = problems(options)
    if found:
        parser.error("; ".join(found))
    from .output import set_verbosity

    set_verbosity(getattr(options, "verbose", False))
    return options


OS_FIXES = {
    errno.EACCES: "check its permissions, or choose another place",
    errno.EPERM: "check its permissions, or choose another place",
    errno.ENOSPC: "the disk is full: free some space (or choose another disk) and run the command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
    errno.EROFS: "the file system is read-only: choose a place you can write to",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that is a folder: name a file",
    errno.ENOENT: "no such file or folder (or a link pointing nowhere): check the path",
    errno.ELOOP: "the path goes round in a circle of links: check the links",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
    errno.EEXIST: "it exists already: choose another name, or remove it",
    errno.EXDEV: "it is on another disk: choose a place on the same disk",
    errno.EPIPE: "the output was closed before everything was written (a pipe that ended early)",
}


def failure_line(exc: BaseException) -> Optional[str]:
    """One line for a failure of the file system or a library's refusal of a damaged file; None for a bug.

    The modules raise ChatkitError with the file and the fix where they know them; this is the net
    under them, so that no such failure reaches the user as a traceback."""
    import zipfile

    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename if exc.filename is not None else None
        fix = OS_FIXES.get(exc.errno, "check the path and the disk")
        return f"{where + ': ' if where else ''}{exc.strerror or exc}; {fix}"
    if isinstance(exc, zipfile.BadZipFile):
        return f"a zip file is damaged or not a zip ({exc}); download or copy it again"
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
        return f"a zip member is encrypted ({exc}); unpack it with its password and pass the folder"
    if isinstance(exc, NotImplementedError) and "compression" in str(exc):
        return f"a zip uses a compression this Python cannot read ({exc}); unpack it and pass the folder"
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read (a JSON file nested beyond what Python reads?); check the file"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
    if type(exc).__name__ in ("SafetensorError", "UnpicklingError", "HeaderTooLarge", "HeaderTooSmall"):
        return (f"a weights file is damaged ({type(exc).__name__}: {str(exc)[:160]}); it was probably cut short "
                "while copying or saving: copy, save or train it again")
    return None


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's main: a ChatkitError, or a failure of the file system or a damaged file, becomes one
    `error:` line on stderr and exit code 1.

    Set CHATKIT_DEBUG=1 to get the full traceback instead. Other exceptions are bugs and keep theirs.
    """
    previous = _exit_on_sigterm()
    try:
        return main(argv)
    except ChatkitError as exc:
        if os.environ.get("CHATKIT_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the boundary: known failures become one line, bugs keep their traceback
        line = failure_line(exc)
        if line is None or os.environ.get("CHATKIT_DEBUG"):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM (kill, a closing terminal) unwinds like Ctrl-C, so half-written files are removed."""
    def terminate(signum, frame):
        raise Terminated

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        return None
