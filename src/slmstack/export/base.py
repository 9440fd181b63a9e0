"""The export contract: :data:`EXPORTERS` (format -> ``write(config, out) -> manifest``) and :func:`export_stack`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from slmstack.registry import Registry

__all__ = ["EXPORTERS", "export_stack"]

EXPORTERS: Registry[Callable[[Any, Path], dict[str, Any]]] = Registry("export format")


def export_stack(config: Any, fmt: str, out: str | Path) -> dict[str, Any]:
    """Write ``config``'s stack to ``out`` in format ``fmt``; the manifest (also ``out/export.json``).

    Raises:
        ConfigError: an unknown format, a stack with a remote backend or without adapters where the format needs
            them, or an adapter the format cannot carry.
        InputError: ``out`` holds files slmstack export did not write.
    """
    from slmstack.errors import ConfigError
    from slmstack.io import atomic_dir, atomic_write_json
    from slmstack.ownership import MARKER, check_dir_ours

    write = EXPORTERS.get(fmt)
    if config.backend is not None:
        raise ConfigError(f"stack {config.name!r} runs on a remote backend: export needs the stack's own model and "
                          "adapters (remove its backend: section)")  # fmt: skip
    out = check_dir_ours(Path(out), "export", "--out folder")
    manifest: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        manifest.update({"format": fmt, "stack": config.name, "model": config.model, **write(config, tmp)})
        atomic_write_json(tmp / "export.json", manifest)
        atomic_write_json(tmp / MARKER, {"written_by": "slmstack", "verb": "export"})

    atomic_dir(out, build)
    return manifest
