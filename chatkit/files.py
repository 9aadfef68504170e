"""Writing files so that nothing is half-written, and the chatkit.json record beside every trained model."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import __version__
from .errors import ChatkitError

# What this toolkit writes beside a trained model: how it was made and how to rebuild it.
TRAINING_INFO_FILE = "chatkit.json"
CHECKPOINT_PREFIX = "checkpoint-"  # the Trainer's checkpoint folders: checkpoint-STEP


def _ordinary_mode(path: str, replaced: str) -> None:
    """The mode of the file being replaced (a private file stays private), else the mode a new file of the
    user's gets (temporary files are created private)."""
    try:
        os.chmod(path, os.stat(replaced).st_mode & 0o7777)
        return
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path`; it replaces `path` only when the block ends without an error.

    On an error or an interrupt the temporary file is removed, and `path` is as it was.
    """
    target = os.path.abspath(path)
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".part")
    os.close(handle)
    try:
        yield temporary
        _ordinary_mode(temporary, target)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back while the block runs (a few renames that must all happen or none), then
    delivered as they would have been."""
    received: List[int] = []
    previous = {}
    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            previous[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    except ValueError:  # not the main thread: signals never arrive here
        pass
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, encoding: str = "utf-8"):
    """A text file opened for writing that appears at `path` whole, or not at all."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding=encoding) as handle:
            yield handle


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def check_outputs(outputs: Dict[str, str], inputs: Sequence[str], overwrite: bool,
                  example: str = "data.jsonl") -> None:
    """The one rule for every file a command writes: its named output and each file it writes beside it.

    `outputs` maps how the user named each file ("OUTPUT", "--preferences", ...) to its path. No output is
    written over one of the command's inputs (not even with --overwrite), no two outputs share a path, a
    folder is never taken for a file, and a file that exists already is replaced only with --overwrite.
    Checked before any work starts, so a refusal costs nothing."""
    seen: List[Tuple[str, str]] = []
    for label, path in outputs.items():
        if os.path.isdir(path):
            raise ChatkitError(f"{path}: {label} is a folder; name a file, such as {os.path.join(path, example)}")
        for source in inputs:
            if source and _same_file(source, path):
                raise ChatkitError(f"{path}: {label} is also an INPUT of this command; name a new file for it")
        for other_label, other in seen:
            if _same_file(other, path):
                raise ChatkitError(f"{path}: {label} and {other_label} name the same file; give each its own")
        seen.append((label, path))
    for label, path in outputs.items():
        if os.path.lexists(path) and not overwrite:
            raise ChatkitError(f"{path} ({label}) exists already; pass --overwrite to replace it, or name "
                               "another file")


LOCK_FILE = ".chatkit.lock"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike):
    """Hold `folder`'s lock for the block: a second training run into the same folder is refused, not run
    alongside (both would write the same files). The operating system releases it if the process dies."""
    path = Path(folder) / LOCK_FILE
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    locked = False
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs are not guarded there
        fcntl = None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ChatkitError(f"--output {folder} is being written by another training run ({holder}); wait "
                                   "for it to finish, or choose another --output") from None
        locked = True
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        if locked:
            path.unlink(missing_ok=True)
            if created and not any(path.parent.iterdir()):
                path.parent.rmdir()  # a run that failed before writing anything leaves no empty folder
        handle.close()


RECORDED_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes", "trl")


def reproducibility(inputs: Sequence[str], seed: int, conversations: Optional[dict] = None) -> dict:
    """What repeating a run takes: the versions of the libraries it ran on, each input's SHA-256 and size (a
    folder's files in order), how many conversations it trained and validated on, and the seed."""
    import platform
    from importlib import metadata

    versions = {"chatkit": __version__, "python": platform.python_version()}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"versions": versions, "seed": seed, "conversations": conversations,
            "data": [file_identity(path) for path in inputs]}


def file_identity(path: str | os.PathLike) -> dict:
    """A file's (or a folder's) SHA-256 and size in bytes: what tells one data set from another."""
    import hashlib

    root, digest, size = Path(path), hashlib.sha256(), 0
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        if root.is_dir():
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return {"file": str(path), "sha256": digest.hexdigest(), "bytes": size}


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_output(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def training_info(method: str, chat_template: Optional[str], base_model: Optional[str] = None, **details) -> dict:
    """The chatkit.json record: one schema for every trainer (details: options, metrics, system_prompt...)."""
    return {"created_by": f"chatkit {__version__}", "base_model": base_model, "method": method,
            "chat_template": chat_template, **details}


def write_training_info(directory: str | os.PathLike, info: dict) -> None:
    write_json(Path(directory) / TRAINING_INFO_FILE, info)


def read_json_object(path: str | os.PathLike, fix: str) -> dict:
    """A JSON file holding an object; anything else is a ChatkitError ending with `fix`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatkitError(f"{path} is damaged ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ChatkitError(f"{path} should hold a JSON object; {fix}")
    return data


def read_training_info(directory: str | os.PathLike) -> dict:
    path = Path(directory) / TRAINING_INFO_FILE
    return read_json_object(path, "delete it or retrain the model") if path.is_file() else {}


def is_complete(checkpoint: str | Path) -> bool:
    """Whether a checkpoint was saved whole and can be resumed: the Trainer writes trainer_state.json last,
    and resuming reads its step count."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    step = state.get("global_step") if isinstance(state, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and step >= 0


def latest_checkpoint(folder: str | Path) -> Optional[str]:
    """The newest complete checkpoint-N folder in `folder`, or None (half-saved ones are passed over)."""
    def step(path: Path) -> int:
        tail = path.name[len(CHECKPOINT_PREFIX):]
        return int(tail) if tail.isdigit() else -1

    found = [path for path in sorted(Path(folder).glob(CHECKPOINT_PREFIX + "*"), key=step) if is_complete(path)]
    return str(found[-1]) if found else None


def cache_dir() -> Path:
    """Where converted models live: $CHATKIT_CACHE, else $XDG_CACHE_HOME/chatkit, else ~/.cache/chatkit."""
    if os.environ.get("CHATKIT_CACHE"):
        return Path(os.environ["CHATKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "chatkit"
