"""The stacking-study YAML (``recipes/stack_study.yaml``).

Example::

    model: default
    data_dir: ../../shared/data
    arms: [A0, A1, A2, A3, S2]
    eval: {ecqa: 800, qasc: 300, commonsenseqa_clean: 500, strategyqa: 300, arc_easy: 300, openbookqa: 300}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from slmstack.config import check_range, load_config_file, require_at_least_one, require_unique
from slmstack.errors import ConfigError

__all__ = ["AttributeSettings", "StudyConfig", "StudyTrain", "load_study_config"]


@dataclass(kw_only=True)
class StudyTrain:
    """LoRA training shared by every arm: the same targets, learning rate, seeds and token budget."""

    token_budget: int | None = field(
        default=None, metadata={"help": "protocol 1: training tokens per arm, prompts included (default 150,000)"}
    )
    epochs: int | None = field(
        default=None, metadata={"help": "protocol 2: passes over each adapter's examples (default 1; every answer "
                                        "adapter sees epochs x train_questions answer examples)"}
    )  # fmt: skip
    rank: int = field(default=16, metadata={"help": "an arm's total rank: one adapter r, or two of r/2"})
    alpha_per_rank: int = 2
    dropout: float = 0.05
    lr: float = 3e-4
    batch_size: int = 8
    max_length: int = 256
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast where native), fp32, bf16"})

    def __post_init__(self) -> None:
        for name in ("token_budget", "epochs"):
            if getattr(self, name) is not None:
                require_at_least_one(self, (name,), "train.")
        require_at_least_one(self, ("alpha_per_rank", "batch_size"), "train.")
        if self.rank < 2 or self.rank % 2:
            raise ConfigError(
                f"train.rank must be an even number >= 2 (two-stage arms get rank/2 each), got {self.rank}"
            )
        check_range(self, "lr", 0, low_open=True, prefix="train.")
        check_range(self, "dropout", 0, 1, high_open=True, prefix="train.")
        check_range(self, "max_length", 16, prefix="train.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass(kw_only=True)
class AttributeSettings:
    """``slmstack attribute`` on one stacked arm (its first seed) at the end of the study."""

    task: str = "ecqa"
    limit: int = 200
    arm: str | None = field(
        default=None, metadata={"help": "the stacked arm to attribute (default: protocol 1 S2, 2 the primary's arm)"}
    )

    def __post_init__(self) -> None:
        require_at_least_one(self, ("limit",), "attribute.")


@dataclass(kw_only=True)
class StudyConfig:
    """Arms x seeds, trained on FLAN CoT questions with their gold rationales, evaluated on held-out and OOD tasks."""

    protocol: int = field(default=2, metadata={"help": "1: the first study as it ran (see docs/study.md for its "
                                                         "flaws); 2: the fair protocol"})  # fmt: skip
    model: str = "default"
    device: str = field(default="auto", metadata={"help": "auto (a GPU where there is one), cpu or cuda"})
    data_dir: str = field(metadata={"help": "folder with flan_cot/ and the evaluation tasks' files"})
    train_sets: list[str] = field(default_factory=lambda: ["ecqa", "qasc", "strategyqa", "creak"])
    train_questions: int = field(default=1600, metadata={"help": "questions drawn from the training pools, evenly"})
    arms: list[str] = field(default_factory=lambda: ["A1", "A2", "R1", "S2", "RS2"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "every arm runs every seed"})
    extra_seeds: list[int] = field(default_factory=list, metadata={"help": "protocol 1: then, for the best arms"})
    best: int = field(default=0, metadata={"help": "protocol 1: how many arms get the extra seeds"})
    primary: list[str] | None = field(
        default=None, metadata={"help": "protocol 2: the contrast named before the run, [arm, against]"}
    )
    secondary: list[list[str]] = field(default_factory=list, metadata={"help": "protocol 2: Holm-corrected"})
    reference: list[str] = field(
        default_factory=list,
        metadata={"help": "protocol 2: arms on another base (G1), run after every cell of arms, each compared with "
                          "the primary's arm; may be added to a study already running"},
    )  # fmt: skip
    k: int = field(default=3, metadata={"help": "passages a retrieve stage passes on"})
    corpus_sets: list[str] = field(
        default_factory=lambda: ["ecqa", "qasc", "strategyqa", "creak", "sensemaking", "aqua"],
        metadata={"help": "the FLAN CoT sets whose training rationales are the retrieval corpus"},
    )
    recall_tokens: int = field(default=32, metadata={"help": "the recall stage's knowledge sentence, in tokens"})
    generated_mix: float = field(
        default=0.5,
        metadata={
            "help": "S2: share of the answer stage's rationales that its own reason stage wrote (the rest gold)"
        },
    )
    reason_tokens: int = 48
    dtype: str = field(
        default="auto",
        metadata={"help": "the format the stages generate in (a stack's dtype: auto is the engine's fastest on the "
                          "model's own weights); scoring is always float32"},
    )  # fmt: skip
    batch_size: int = field(default=32, metadata={"help": "engine rows per step and scoring batch"})
    eval: dict[str, int] = field(
        default_factory=lambda: {
            "ecqa": 800,
            "qasc": 300,
            "commonsenseqa_clean": 500,
            "strategyqa": 300,
            "arc_easy": 300,
            "openbookqa": 300,
        }
    )
    attribute: AttributeSettings = field(default_factory=AttributeSettings)
    train: StudyTrain = field(default_factory=StudyTrain)
    source: Path | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from slmstack.evaluation.flan_cot import CORPUS_ONLY, FLAN_COT
        from slmstack.formats import DTYPES
        from slmstack.registry import did_you_mean
        from slmstack.study.arms import ARMS

        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for arm in self.arms + self.reference:
            if arm not in ARMS:
                raise ConfigError(
                    f"arms: unknown arm {arm!r}.{did_you_mean(arm, list(ARMS))} Known: {', '.join(ARMS)}"
                )
        for arm in self.arms:
            if ARMS[arm].model:
                raise ConfigError(f"arms: {arm} runs on another base ({ARMS[arm].model}); list it under reference")
        for arm in self.reference:
            if not ARMS[arm].model:
                raise ConfigError(f"reference: {arm} runs on the study's base; list it under arms")
        for name in self.corpus_sets:
            if name not in FLAN_COT + CORPUS_ONLY:
                raise ConfigError(
                    f"corpus_sets: {name!r} is not a FLAN CoT set; use {', '.join(FLAN_COT + CORPUS_ONLY)}"
                )
        for name in self.train_sets:
            if name not in FLAN_COT:
                raise ConfigError(f"train_sets: {name!r} is not a FLAN CoT set; use {', '.join(FLAN_COT)}")
        if not self.arms or not self.seeds or not self.eval or not self.train_sets:
            raise ConfigError("arms, seeds, eval and train_sets need at least one entry each")
        if any(s < 0 for s in self.seeds + self.extra_seeds):
            raise ConfigError("seeds and extra_seeds must be >= 0")
        if any(n < 0 for n in self.eval.values()):
            raise ConfigError("eval: each task's item count must be >= 0 (0: all)")
        require_at_least_one(self, ("train_questions", "reason_tokens", "batch_size", "k", "recall_tokens"))
        if self.protocol not in (1, 2):
            raise ConfigError(f"protocol must be 1 (the first study) or 2 (the fair protocol), got {self.protocol}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device {self.device!r} is not valid. Use auto, cpu, cuda or cuda:N.")
        check_range(self, "generated_mix", 0, 1)
        check_range(self, "best", 0)
        require_unique(self, ("arms", "seeds", "extra_seeds", "train_sets", "corpus_sets"))
        both = sorted(set(self.seeds) & set(self.extra_seeds))
        if both:
            raise ConfigError(f"seed {both[0]} is in both seeds and extra_seeds; give each seed once")
        self._check_protocol_fields()
        if self.protocol == 2:
            self._check_protocol_2()
        self._check_tasks()
        if self.attribute.arm is not None and self.attribute.arm not in self.arms:
            raise ConfigError(f"attribute.arm {self.attribute.arm!r} is not one of the arms ({', '.join(self.arms)})")

    @property
    def attributed_arm(self) -> str | None:
        """The arm whose stages are attributed at the end, if it is a stack in this study."""
        from slmstack.study.arms import ARMS

        arm = self.attribute.arm or ("S2" if self.protocol == 1 else (self.primary or [None])[0])
        return arm if arm in self.arms and len(ARMS[arm].stages) > 1 else None

    def _check_protocol_fields(self) -> None:
        """A field of the other protocol cannot mean anything here: refused, never ignored; the rest get defaults."""
        t = self.train
        other = {1: [("train.epochs", t.epochs), ("primary", self.primary), ("secondary", self.secondary or None),
                     ("reference", self.reference or None)],
                 2: [("train.token_budget", t.token_budget)]}[self.protocol]  # fmt: skip
        given = [name for name, value in other if value is not None]
        if given:
            raise ConfigError(f"{given[0]} belongs to protocol {3 - self.protocol}, and this study runs protocol "
                              f"{self.protocol}; remove it")  # fmt: skip
        if self.protocol == 1:
            t.token_budget = 150_000 if t.token_budget is None else t.token_budget
        else:
            t.epochs = 1 if t.epochs is None else t.epochs

    def _check_protocol_2(self) -> None:
        """Fixed seeds for every arm (nothing chosen on test results), and contrasts named before the run."""
        if self.extra_seeds or self.best:
            raise ConfigError("protocol 2 runs every arm on every seed in seeds: extra_seeds and best (seeds chosen "
                              "on test results) belong to protocol 1; remove them")  # fmt: skip
        if self.primary is None and (len(self.arms) > 1 or self.secondary):
            raise ConfigError("protocol 2 tests one contrast named before the run: add primary: [arm, against] "
                              "(e.g. [RS2, R1])")  # fmt: skip
        named = [("primary", self.primary)] if self.primary is not None else []
        named += [(f"secondary[{i}]", p) for i, p in enumerate(self.secondary)]
        for label, pair in named:
            if len(pair) != 2 or pair[0] == pair[1] or any(arm not in self.arms for arm in pair):
                raise ConfigError(f"{label}: give two different arms of this study, [arm, against]; got {pair}")
        if self.reference and self.primary is None:
            raise ConfigError("reference: a reference arm is compared with the primary's arm; add primary")
        pairs = [tuple(p) for _, p in named]
        if len(set(pairs)) != len(pairs):
            raise ConfigError("secondary: a contrast is named twice (or repeats the primary)")

    def _check_tasks(self) -> None:
        """Every evaluation task, and the attribution's, must exist and be multiple choice (items are 0/1)."""
        from slmstack.evaluation.tasks import get_task

        for label, name in [*((f"eval.{t}", t) for t in self.eval), ("attribute.task", self.attribute.task)]:
            try:
                spec = get_task(name)
            except ConfigError as exc:
                raise ConfigError(f"{label}: {exc}") from None
            if spec.kind != "multiple_choice":
                raise ConfigError(f"{label}: task {name!r} is {spec.kind}; the study scores multiple-choice tasks")

    def resolve(self, path: str) -> Path:
        """A path from the YAML, relative to the YAML's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.source is None else self.source.parent / p


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study YAML (strict: unknown fields are errors naming the file)."""
    return load_config_file(StudyConfig, path, overrides)
