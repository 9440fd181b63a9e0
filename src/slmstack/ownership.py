"""Which paths a verb may write: a file or folder is slmstack's only if it proves it.

One rule for every output of every verb, so that nothing a user made is ever overwritten:

- **A folder** (``--out`` of distill, train, prune, federate, study, transfer, attribute) may be written when it
  does not exist, is empty, or holds the marker ``.slmstack.json`` that the same verb wrote when it first claimed
  it. Folders written before markers existed prove themselves by the verb's own record file (:data:`LEGACY`: a
  glob pattern and the fields its JSON must hold), which the verb then reads and checks as before. Anything else
  is refused, byte for byte unchanged.
- **A file** (``eval --out`` and the report beside it, ``compare --png``, ``run --output``) may be written when
  it does not exist or when its content proves it is ours: each kind of file has a proof (a results JSON's
  fields, a report's first line, a chart's ``Software``/``Creator`` text, a results line's key).

Example:
    >>> out = claim_dir(Path("runs/train"), "train", "--out folder", {"run.json": json_fields("stack", "data")})
    >>> check_file_ours(Path("r.json"), "--out results file", json_fields("tasks", "target"))
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from slmstack.errors import InputError
from slmstack.io import atomic_write_json, check_output_dir, check_output_file

__all__ = [
    "LEGACY",
    "MARKER",
    "check_dir_ours",
    "check_file_ours",
    "claim_dir",
    "chart_proof",
    "first_line_proof",
    "json_fields",
]

MARKER = ".slmstack.json"
_MAX_PROOF_BYTES = 64 << 20  # a file larger than this is not one of our reports or charts

Proof = Callable[[bytes], bool]


def check_dir_ours(path: Path, verb: str, what: str, legacy: dict[str, Proof] | None = None) -> Path:
    """``path`` if ``verb`` may write into it (new, empty, or claimed by ``verb``); nothing is written.

    Raises:
        InputError: the folder holds files slmstack ``verb`` did not write, or is another verb's output.
    """
    path = check_output_dir(Path(path), what)
    if not path.is_dir() or not any(path.iterdir()):
        return path
    marker = path / MARKER
    if marker.is_file():
        owner = _marker_verb(marker)
        if owner != verb:
            raise InputError(f"{path}: holds the output of slmstack {owner}, not {verb}, so it was left untouched. "
                             f"Pass another {what}.")  # fmt: skip
        return path
    if any(_passes(p, proof) for pattern, proof in (legacy or {}).items() for p in path.glob(pattern)):
        return path
    raise InputError(f"{path}: is not empty and was not written by slmstack {verb}, so it was left untouched. "
                     f"Pass a new or empty {what}.")  # fmt: skip


def claim_dir(path: Path, verb: str, what: str, legacy: dict[str, Proof] | None = None) -> Path:
    """:func:`check_dir_ours`, then create the folder and mark it as ``verb``'s output."""
    path = check_dir_ours(path, verb, what, legacy)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        atomic_write_json(path / MARKER, {"written_by": "slmstack", "verb": verb})
    return path


def _passes(path: Path, proof: Proof) -> bool:
    try:
        return path.is_file() and path.stat().st_size <= _MAX_PROOF_BYTES and proof(path.read_bytes())
    except OSError:
        return False


def _marker_verb(marker: Path) -> str:
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("written_by") != "slmstack" or not isinstance(data.get("verb"), str):
        raise InputError(f"{marker}: not an slmstack output marker, so the folder was left untouched. "
                         "Pass a new or empty folder.")  # fmt: skip
    return data["verb"]


def _legacy() -> dict[str, dict[str, Proof]]:
    """Per verb, the record file that proves a folder written before markers existed (checked by its fields)."""
    return {
        "distill": {"distill.json": json_fields("teacher", "stack", "config")},
        "train": {"run.json": json_fields("stack", "data", "stages")},
        "prune": {"*/prune_report.json": json_fields("seconds")},
        "federate": {"plan.json": json_fields("model", "clients", "heldout_path")},
        "study": {"study.json": json_fields("model", "data_dir", "arms")},
        "transfer": {"study.json": json_fields("model", "collection", "splits")},
        "attribute": {"attribution.json": json_fields("stack", "tasks")},
    }


def check_file_ours(path: Path, what: str, proof: Proof) -> Path:
    """``path`` if it does not exist or its bytes pass ``proof``; else refused with the file left untouched."""
    path = check_output_file(Path(path), what)
    if not path.exists():
        return path
    if not path.is_file():
        raise InputError(f"{path}: not a regular file; the {what} must be a file path.")
    try:
        ours = path.stat().st_size <= _MAX_PROOF_BYTES and proof(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} to check it ({exc.strerror}).") from None
    if not ours:
        raise InputError(f"{path}: exists and is not a {what} written by slmstack, so it was left untouched. "
                         "Pass another path, or remove the file.")  # fmt: skip
    return path


def json_fields(*fields: str) -> Proof:
    """Proof of a JSON file of ours: an object holding every one of ``fields``."""

    def proof(data: bytes) -> bool:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            return False
        return isinstance(obj, dict) and all(f in obj for f in fields)

    return proof


def first_line_proof(line: str) -> Proof:
    """Proof of a text report of ours: its first line is ``line``."""
    head = line.encode("utf-8")
    return lambda data: data.split(b"\n", 1)[0].rstrip(b"\r") == head


# matplotlib writes this into the chart's metadata (PNG ``Software``, PDF and SVG ``Creator``)
CHART_CREATOR = "slmstack"
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"%PDF": "pdf", b"<?xml": "svg"}


def chart_proof(data: bytes) -> bool:
    """Proof of a chart of ours: a PNG, PDF or SVG whose metadata names slmstack."""
    kind = next((k for magic, k in _MAGIC.items() if data.startswith(magic)), None)
    if kind == "png":  # a tEXt chunk: keyword, NUL, text
        return b"Software\x00" + CHART_CREATOR.encode() in data
    return kind is not None and CHART_CREATOR.encode() in data


LEGACY = _legacy()
