"""Crash-safe file helpers: atomic writes and line-numbered JSONL reading.

Nothing is ever half-written: every output goes to a temp file in the same directory, is fsynced,
then renamed over the target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slmstack.errors import InputError, SlmstackError

__all__ = [
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "check_json_shape",
    "check_output_dir",
    "check_output_file",
    "check_input_file",
    "guard_read",
    "iter_jsonl",
    "jsonl_lines",
    "read_done_jsonl",
    "read_json",
    "read_text",
    "save_figure",
]

CHART_CREATOR = "slmstack"  # written into every chart's metadata: how a chart proves it is ours

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_input_file(path: Path, what: str, fix: str = "") -> Path:
    """``path`` if it is an existing regular file, else an :class:`InputError` naming it and the fix."""
    path = Path(path)
    fix = f" {fix}" if fix else ""
    if path.is_dir():
        raise InputError(f"{path}: is a directory, but the {what} must be a file.{fix}")
    if not path.exists():
        raise InputError(f"{path}: {what} not found. Check the path.{fix}")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file; the {what} must be a file.{fix}")
    return path


@contextmanager
def guard_read(path: Path, what: str, fix: str = "", error: type[SlmstackError] = InputError) -> Iterator[None]:
    """Turn any failure while reading ``path`` (unreadable, corrupt, wrong format) into one :class:`InputError`.

    File formats are parsed by other libraries (gguf, safetensors, json, yaml), each with its own
    exception types; at this boundary every one of them means "this file cannot be used", so they
    all become the same clear message naming the file and the fix.

    Example:
        >>> with guard_read(path, "adapter weights", "re-save the adapter"):
        ...     tensors = load_file(path)
    """
    try:
        yield
    except SlmstackError:
        raise
    except Exception as exc:  # noqa: BLE001  (see the docstring: a corrupt file raises anything)
        reason = _reason(exc)
        raise error(f"{path}: cannot read the {what} ({reason}).{f' {fix}' if fix else ''}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) < 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_text(path: Path, what: str, fix: str = "") -> str:
    """The UTF-8 text of a file, or an :class:`InputError` naming the path, what it should be, and the fix."""
    path = check_input_file(path, what, fix)
    with guard_read(path, what, fix):
        return path.read_text(encoding="utf-8")


def read_json(path: Path, what: str, fix: str = "", expect: type | dict[str, Any] | None = None) -> Any:
    """Parse a JSON file; a malformed one raises :class:`InputError` with the file and line.

    Args:
        path: the file.
        what: what it should be, for the message ("federation plan").
        fix: how to fix it, appended to the message.
        expect: ``dict`` or ``list``: the top-level type; a mapping ``{key: type or tuple of types}``: a JSON
            object holding at least those keys with values of those types. A file written by the tool and
            read back (a plan, a checkpoint record, a report) is checked this way before it is used.
    """
    text = read_text(path, what, fix)
    suffix = f" {fix}" if fix else ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: the {what} is not valid JSON ({exc.msg}).{suffix}") from None
    except RecursionError:
        raise InputError(f"{path}: the {what} is nested too deeply to be read.{suffix}") from None
    if expect is not None:
        check_json_shape(data, expect, f"{path}: the {what}", suffix)
    return data


def check_json_shape(data: Any, expect: type | dict[str, Any], where: str, suffix: str = "") -> None:
    """Raise :class:`InputError` unless ``data`` has the shape ``expect`` describes (see :func:`read_json`)."""
    if isinstance(expect, type):
        if not isinstance(data, expect):
            raise InputError(f"{where} must be a JSON {_json_name(expect)}, got {_json_name(type(data))}.{suffix}")
        return
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a JSON object, got {_json_name(type(data))}.{suffix}")
    for key, types in expect.items():
        if key not in data:
            raise InputError(f"{where} lacks the field {key!r}.{suffix}")
        if not isinstance(data[key], types) or (isinstance(data[key], bool) and bool not in _as_tuple(types)):
            raise InputError(f"{where}: field {key!r} has the wrong type ({_json_name(type(data[key]))}).{suffix}")


def _as_tuple(types: Any) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _json_name(tp: type) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return names.get(tp, "null" if tp is type(None) else tp.__name__)


def check_output_file(path: Path, what: str) -> Path:
    """``path`` if a file can be written there: not a directory, and no parent is a file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; the {what} must be a file path (e.g. {path / 'results.jsonl'}).")
    _check_parents(path, what)
    return path


def check_output_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory or can become one: an existing file there is refused, never replaced."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory; the {what} must be a directory. Use another path.")
    _check_parents(path, what)
    return path


def _check_parents(path: Path, what: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{path}: {parent} is a file, so the {what} cannot be created there.")
            return


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_dir(out: Path, write: Any) -> Path:
    """Build a directory with ``write(tmp)`` beside ``out``, then swap it in (a reader never sees half of it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure atomically (format from the suffix), naming slmstack in its metadata, and close it.

    The metadata (PNG ``Software``, PDF and SVG ``Creator``) is how :func:`slmstack.ownership.chart_proof`
    recognises a chart of ours before it is replaced.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=dpi, metadata={"Software" if fmt == "png" else "Creator": CHART_CREATOR})
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def iter_jsonl(path: Path, skip_bad: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSONL file.

    Raises:
        InputError: naming the file and line of a malformed line (unless ``skip_bad``).
    """
    path = check_input_file(path, "input file")
    # streamed, so a large data file is never held whole; guard_read turns a decoding error into one line
    with guard_read(path, "input file"), path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                if skip_bad:
                    continue
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise InputError(f"{path}:{number}: not valid JSON ({msg}). Fix or remove the line.") from None
            if not isinstance(record, dict):
                if skip_bad:
                    continue
                raise InputError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_done_jsonl(path: Path, key: str) -> set[Any]:
    """Values of ``key`` in an append-only results file, repairing a torn last line once the file is shown ours.

    A process killed mid-append can leave a partial last line; it is cut off so that the item is simply
    redone on resume. Nothing is written until every complete line has been read as one of our records
    (a JSON object holding ``key``), and a torn tail is cut only if it starts as one of our records does:
    a file that is not ours is refused byte for byte unchanged.
    """
    path = check_output_file(path, "results file")
    if not path.exists():
        return set()
    fix = "Pass another output path, or remove the file to start over."
    with guard_read(path, "results file", fix):
        data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    not_ours = InputError(f"{path}: not a results file written by slmstack (each line must be a JSON object "
                          f"with {key!r}), so it was left untouched. {fix}")  # fmt: skip
    done = set()
    try:
        for line in jsonl_lines(data[:end]):
            done.add(json.loads(line)[key])
    except (ValueError, KeyError, TypeError, RecursionError):  # ValueError: bad JSON or not UTF-8
        raise not_ours from None
    torn = data[end:]
    if torn:
        if not torn.startswith(b'{"' + key.encode() + b'":'):
            raise not_ours
        with path.open("r+b") as fh:
            fh.truncate(end)
    return done


def jsonl_lines(data: str | bytes) -> list[str]:
    """The non-blank lines of JSONL text, split on newlines only.

    ``str.splitlines`` also splits on U+0085, U+2028 and U+2029, which JSON allows unescaped inside a
    string, so it would cut such a record in two.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return [line for line in text.split("\n") if line.strip()]
