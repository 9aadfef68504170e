"""What every script shares: the parser built from an options dataclass, `--config` files, `run_main`.

transformers' HfArgumentParser builds parsers from dataclasses too, but it doubles every flag with an
underscore spelling, shows booleans as `--flag [FLAG]`, and has no positional arguments or deprecated
spellings; this builder keeps the same idea (one declaration per option) with the command lines our
users already type.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Type, TypeVar

from .errors import ChatkitError
from .options import flag_name, problems

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
    text = file.read_text(encoding="utf-8")
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
        elif value is not None and not many and not isinstance(value, kind) and not (kind is float and
                                                                                  isinstance(value, int)):
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


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's main: a ChatkitError becomes one `error:` line on stderr and exit code 1.

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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM (kill, a closing terminal) unwinds like Ctrl-C, so half-written files are removed."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        return None
