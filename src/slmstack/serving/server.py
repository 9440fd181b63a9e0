"""Load the stacks and run the app under uvicorn (``slmstack serve``)."""

from __future__ import annotations

import errno
import importlib.util
import logging
import socket
from typing import Any

from slmstack.errors import ConfigError
from slmstack.serving.settings import ServeSettings

logger = logging.getLogger(__name__)

__all__ = ["bind_socket", "load_stacks", "require_serve", "serve", "start_engines"]


def require_serve() -> None:
    """One clear line when the ``serve`` extra is missing."""
    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'slmstack[serve]'")


def load_stacks(stack_files: list[str], models: list[str], dtype: str | None = None) -> dict[str, Any]:
    """Model name -> loaded :class:`Stack`: each stack YAML under its ``name``, each ``NAME=REF`` as a plain model.

    With neither, the packaged default stack. Names must be unique. Stacks on the same base model share
    one loaded copy (and their rows share forward passes). ``dtype`` overrides every stack's own.
    """
    from slmstack.stack.runtime import Stack

    configs = stack_configs(stack_files, models, dtype)
    return {c.name: s for c, s in zip(configs, Stack.sharing_bases(configs), strict=True)}


def stack_configs(stack_files: list[str], models: list[str], dtype: str | None = None,
                  engine: str = "auto") -> list[Any]:  # fmt: skip
    """The validated configs :func:`load_stacks` would load (nothing is loaded).

    ``engine`` other than ``auto`` overrides every stack's own.
    """
    from slmstack.models import pick_device, pick_dtype
    from slmstack.stack.config import GenerationSettings, StackConfig, StageConfig, load_stack_config

    configs = [load_stack_config(f) for f in stack_files]
    for item in models:
        name, sep, ref = item.partition("=")
        if not sep or not name or not ref:
            raise ConfigError(f"--model {item!r}: give NAME=REF, e.g. --model base=default")
        stage = StageConfig(name="answer", role="", template="{input}", generation=GenerationSettings())
        configs.append(StackConfig(name=name, model=ref, stages=[stage], description=f"the plain model {ref}"))
    if not configs:
        configs = [load_stack_config(None)]
    if (dtype or engine != "auto") and all(c.backend is not None for c in configs):
        flag = "--dtype" if dtype else "--engine"
        raise ConfigError(f"{flag} applies to stacks that run in process, and every stack served here runs on a "
                          f"remote backend; leave {flag} out")  # fmt: skip
    for config in configs:  # --dtype and --engine apply to the stacks that run in process
        if config.backend is None:
            config.dtype = dtype or config.dtype
            config.engine = config.engine if engine == "auto" else engine
    names = [c.name for c in configs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"two served models are named {duplicated[0]!r}; rename one stack (its name field)")
    for config in configs:
        if config.backend is None:
            pick_dtype(config.dtype, pick_device(config.device))
    return configs


def start_engines(stacks: dict[str, Any], settings: ServeSettings) -> None:
    """Build every in-process stack's generation engine now, so that options it cannot run with fail at start-up.

    Engines with compiled decode steps (``--engine compiled``) or CUDA graphs also run a step of every batch size
    they will use (:meth:`slmstack.engine.Engine.warm_up`), so the server reports ready only once they are built.

    Without this the engine would be built in the app's lifespan, where a failure is uvicorn's "Application
    startup failed" (exit status 0, after a traceback) instead of one line and exit status 2.

    Raises:
        ConfigError: naming the stack, what failed, and the fix.
    """
    from slmstack.errors import SlmstackError
    from slmstack.stack.backends import LocalBackend

    for name, stack in stacks.items():
        backend = stack.backend
        if not isinstance(backend, LocalBackend) or backend._engine is not None:
            continue
        backend.max_batch = settings.max_batch_size  # rows per engine step
        try:
            engine = backend.engine  # the property builds the engine
            if engine is not None:
                engine.warm_up()  # compiled steps / CUDA graphs built now, before the server reports ready
        except SlmstackError as exc:
            raise ConfigError(f"stack {name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001  (any failure to build means these options cannot serve)
            raise ConfigError(
                f"stack {name!r}: the engine cannot load this model with these options "
                f"({type(exc).__name__}: {str(exc)[:200]}); try --engine auto or --dtype float32"
            ) from None


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, taken before any model is loaded so that a bad address fails at once.

    Raises:
        ConfigError: naming ``--host`` (not an address of this machine) or ``--port`` (in use, or not allowed).
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise ConfigError(f"--host {host!r} is not a valid address ({getattr(exc, 'strerror', None) or exc}); "
                          "use e.g. 127.0.0.1 or 0.0.0.0") from None  # fmt: skip
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port} is already in use on {host}; pick another port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
        raise ConfigError(f"--port {port} on --host {host}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def serve(stacks: dict[str, Any], settings: ServeSettings, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT.

    On either signal the server stops accepting connections, cancels the generation in flight (its clients
    get a 503), and exits: within a few seconds, since decoding stops at its next token.
    """
    import uvicorn

    from slmstack.serving.app import build_app

    app = build_app(stacks, settings)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.stop()
            super().handle_exit(sig, frame)

    sock = sock or bind_socket(settings.host, settings.port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    logger.info("serving %s on http://%s:%d", ", ".join(stacks), settings.host, settings.port)
    _Server(config).run(sockets=[sock])
