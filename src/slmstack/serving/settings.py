"""Server settings: binding, micro-batching, request limits, the optional API key."""

from __future__ import annotations

from dataclasses import dataclass, field

from slmstack.errors import ConfigError

__all__ = ["ServeSettings"]


@dataclass(kw_only=True)
class ServeSettings:
    """How ``slmstack serve`` listens, batches and limits requests."""

    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback unless told otherwise)"})
    port: int = 8000
    max_batch_size: int = field(default=16, metadata={"help": "requests per stack batch"})
    max_wait_ms: float = field(default=20.0, metadata={"help": "how long a request waits for company"})
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int = 2048
    max_tokens: int = field(default=1024, metadata={"help": "the largest max_tokens a request may ask"})
    api_key: str | None = field(default=None, repr=False, metadata={"help": "Bearer token; None: open"})

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_body_bytes", "max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ConfigError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if not self.host.strip():
            raise ConfigError("--host is empty; use e.g. 127.0.0.1")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty (from --api-key or SLMSTACK_API_KEY), which would leave the API "
                              "open; give a real key, or leave both unset to serve without one")  # fmt: skip
