"""The stack definition: a base model and an ordered list of prompted stages, read from YAML.

Templates are Python format strings. ``{input}`` is the user's input and ``{NAME}`` is the output
of the earlier stage ``NAME``; write ``{{`` and ``}}`` for literal braces. References to unknown or
later stages are rejected when the file is loaded, not when it runs.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from slmstack.config import apply_overrides, build_dataclass, check_range, dataclass_to_dict, load_yaml
from slmstack.engine.options import ENGINE_MODES as ENGINES
from slmstack.engine.text import GenerationSettings
from slmstack.errors import ConfigError
from slmstack.formats import DTYPES, FP16_WEIGHTS, WEIGHT_FORMATS
from slmstack.io import atomic_write_text

__all__ = [
    "BackendConfig",
    "GenerationSettings",
    "StackConfig",
    "StageConfig",
    "default_stack_path",
    "load_stack_config",
    "save_stack_config",
]

INPUT_FIELD = "input"
DEFAULT_K = 3  # passages a retrieve stage passes on


@dataclass(kw_only=True)
class BackendConfig:
    """A remote OpenAI-compatible engine that generates for the stack's stages.

    Example (vLLM serving the base with two LoRA modules)::

        backend:
          url: http://127.0.0.1:8001/v1
          base_model: HuggingFaceTB/SmolLM2-135M-Instruct
          models: {recall: recall, answer: answer}
    """

    type: str = field(default="openai", metadata={"help": "backend kind: openai, vllm or llamacpp"})
    url: str = field(metadata={"help": "the server's base URL, ending in /v1"})
    base_model: str = field(metadata={"help": "model name of the bare base model there"})
    models: dict[str, str] = field(default_factory=dict, metadata={"help": "stage -> model name of its adapter"})
    api_key_env: str | None = field(default=None, metadata={"help": "environment variable holding the API key"})
    timeout_s: float = 300.0
    max_concurrency: int = field(default=16, metadata={"help": "rows sent at once"})
    retries: int = field(default=2, metadata={"help": "extra tries after a connection error, a timeout, 429 or 5xx"})

    def __post_init__(self) -> None:
        check_range(self, "retries", 0, 10, prefix="backend.")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"backend.url: {self.url!r} is not an http(s) URL; e.g. http://127.0.0.1:8001/v1")
        check_range(self, "timeout_s", 0, low_open=True, prefix="backend.")
        check_range(self, "max_concurrency", 1, prefix="backend.")


@dataclass(kw_only=True)
class StageConfig:
    """One stage: a role (system prompt), a template, decoding settings and an optional LoRA adapter.

    A ``kind: retrieve`` stage runs no model: its rendered template is a query to the passage index ``index``
    (built by ``slmstack index``), and its output is the top ``k`` passages, one a line.

    Example (retrieve, then answer from the passages)::

        - {name: facts, kind: retrieve, index: runs/index, k: 3, template: "{input}"}
        - {name: answer, template: "Facts: {facts} Question: {input}"}
    """

    name: str = field(metadata={"help": "identifier used by later templates as {name}"})
    kind: Literal["generate", "retrieve"] = field(
        default="generate", metadata={"help": "generate, or retrieve (query an index; no model)"}
    )
    role: str = field(default="", metadata={"help": "what this stage does; used as the system prompt"})
    template: str = field(metadata={"help": "prompt with {input} and {earlier_stage} fields"})
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    adapter: str | None = field(default=None, metadata={"help": "peft LoRA directory, relative to the YAML"})
    index: str | None = field(default=None, metadata={"help": "retrieve: the index folder, relative to the YAML"})
    k: int | None = field(default=None, metadata={"help": "retrieve: passages to pass on (default 3)"})
    exclude: list[str] | None = field(default=None, metadata={"help": "retrieve: passage ids never to return"})

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name == INPUT_FIELD:
            raise ConfigError(f"stage name {self.name!r} must be a Python identifier other than 'input'")
        if self.kind == "retrieve":
            if self.index is None:
                raise ConfigError(f"stage {self.name}: a retrieve stage needs index: (a folder from slmstack index)")
            if self.adapter is not None:
                raise ConfigError(f"stage {self.name}: a retrieve stage runs no model, so it takes no adapter")
            self.k = DEFAULT_K if self.k is None else self.k
            check_range(self, "k", 1, prefix=f"stage {self.name}: ")
        else:
            given = [f for f in ("index", "k", "exclude") if getattr(self, f) is not None]
            if given:
                raise ConfigError(f"stage {self.name}: {given[0]} applies to retrieve stages; add kind: retrieve, "
                                  f"or leave {given[0]} out")  # fmt: skip


@dataclass(kw_only=True)
class StackConfig:
    """A stack of stages sharing one base model.

    Example:
        >>> cfg = load_stack_config(default_stack_path())
        >>> [s.name for s in cfg.stages]
        ['restate', 'recall', 'reason', 'answer']
    """

    name: str = "stack"
    description: str = ""
    model: str = field(default="default", metadata={"help": "model reference: default, a .gguf, a dir, a hub id"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16, float16; on a CPU also "
                                                         "float16-, bfloat16-, int8- and int4-weights"})  # fmt: skip
    engine: str = field(
        default="auto",
        metadata={
            "help": "auto (the engine where it runs the model), native, compiled (native, decode steps compiled), hf"
        },
    )
    chat_template: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template"})
    batch_size: int = 8
    max_input_tokens: int | None = field(default=None, metadata={"help": "default: context window - max_new"})
    on_overflow: Literal["truncate", "error"] = "truncate"
    request_sampling: Literal["final", "all"] = field(
        default="final", metadata={"help": "serving: a request's temperature/top_p/seed/stop apply to the final "
                                           "stage only, or to every stage"}
    )  # fmt: skip
    stages: list[StageConfig] = field(default_factory=list)
    inputs: list[str] = field(
        default_factory=list, metadata={"help": "more fields each input carries besides {input} (e.g. options); "
                                                "templates name them, and an input without one gets ''"}
    )  # fmt: skip
    backend: BackendConfig | None = field(default=None, metadata={"help": "remote engine; none: run in process"})
    source: Path | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: a stack needs at least one stage")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_range(self, "max_input_tokens", 1)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported. Use one of {', '.join(DTYPES)}.")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine == "hf" and self.dtype in WEIGHT_FORMATS and self.dtype != FP16_WEIGHTS:
            raise ConfigError(f"dtype {self.dtype!r} is a weight format of slmstack's engine, but engine is hf "
                              "(transformers' generate); use engine: auto, or a dtype such as float32")  # fmt: skip
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} is not valid. Use auto, cpu, cuda or cuda:N.")
        for name in self.inputs:
            if not name.isidentifier() or name == INPUT_FIELD or name in {s.name for s in self.stages}:
                raise ConfigError(f"inputs: {name!r} must be a Python identifier other than 'input' and the stages' "
                                  "names")  # fmt: skip
        _check_templates(self.stages, self.inputs)
        if self.stages[-1].kind == "retrieve":
            raise ConfigError(f"stages: the last stage ({self.stages[-1].name}) writes the answer, so it cannot be a "
                              "retrieve stage; add a stage that reads its passages")  # fmt: skip
        if self.backend is not None:
            for name in ("device", "dtype", "engine"):  # how the process loads and runs a model: nothing to apply to
                if getattr(self, name) != "auto":
                    raise ConfigError(f"{name}: {getattr(self, name)!r} applies to stacks that run in process, but "
                                      f"this stack's stages run on the backend at {self.backend.url}; leave {name} "
                                      "out (set the remote engine's own options there)")  # fmt: skip
            unknown = sorted(set(self.backend.models) - {s.name for s in self.stages})
            if unknown:
                raise ConfigError(f"backend.models: {unknown[0]!r} is not a stage; stages are "
                                  f"{', '.join(s.name for s in self.stages)}")  # fmt: skip

    def stage(self, name: str) -> StageConfig:
        """Return the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"no stage {name!r}; stages are {', '.join(s.name for s in self.stages)}")

    def adapter_path(self, stage: StageConfig) -> Path | None:
        """The stage's adapter directory, resolved relative to the YAML file it came from."""
        return self._resolve(stage.adapter)

    def index_path(self, stage: StageConfig) -> Path | None:
        """A retrieve stage's index folder, resolved relative to the YAML file it came from."""
        return self._resolve(stage.index)

    def _resolve(self, value: str | None) -> Path | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path


def template_fields(template: str) -> list[str]:
    """Names referenced by a template, e.g. ``['input', 'recall']``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"template is not a valid format string ({exc}); write {{{{ and }}}} for braces") from None
    return [name for _, name, _, _ in parsed if name is not None]


def _check_templates(stages: list[StageConfig], inputs: list[str]) -> None:
    seen: list[str] = []
    all_names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise ConfigError(f"stages[{i}].name: duplicate stage name {stage.name!r}")
        try:
            names = template_fields(stage.template)
        except ValueError as exc:
            raise ConfigError(f"stages[{i}].template ({stage.name}): {exc}") from None
        for ref in names:
            if ref == INPUT_FIELD or ref in seen or ref in inputs:
                continue
            if ref in all_names:
                problem = f"refers to {{{ref}}}, a later stage; a stage can use only earlier stages' outputs"
            elif ref == "":
                problem = "has an empty {} field; name it {input} or an earlier stage"
            else:
                allowed = ", ".join("{" + n + "}" for n in [INPUT_FIELD, *inputs, *seen])
                problem = f"refers to unknown field {{{ref}}}; allowed here: {allowed}"
            raise ConfigError(f"stages[{i}].template ({stage.name}) {problem}")
        seen.append(stage.name)


def default_stack_path() -> Path:
    """The packaged 4-stage default stack (restate -> recall -> reason -> answer)."""
    return Path(str(resources.files("slmstack.stack") / "configs" / "default_stack.yaml"))


def load_stack_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StackConfig:
    """Load and validate a stack YAML (the default stack when ``path`` is None).

    Raises:
        ConfigError: naming the file and the field, for unknown/missing fields, wrong types and bad templates.
    """
    path = Path(path) if path is not None else default_stack_path()
    data = apply_overrides(load_yaml(path), overrides or [])
    config = build_dataclass(StackConfig, data, source=path)
    config.source = path.resolve()
    return config


def save_stack_config(config: StackConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML atomically; :func:`load_stack_config` reads it back equal.

    A retrieve stage's index folder is written as an absolute path, so the YAML works from wherever it is saved.
    """
    data = dataclass_to_dict(config)
    for stage, saved in zip(config.stages, data["stages"], strict=True):
        if stage.kind == "retrieve":
            saved["index"] = str(Path(config.index_path(stage)).resolve())
        else:  # a generate stage's YAML stays as it was before retrieve stages existed
            for key in ("kind", "index", "k", "exclude"):
                saved.pop(key)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    return atomic_write_text(Path(path), text)
