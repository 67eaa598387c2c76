"""The run configuration: one dataclass, read from a TOML file with sections matching its fields."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .models import DEFAULT_MODEL, LoraSettings


@dataclass
class DataSettings:
    pool: str = "data/arith/pool.jsonl"
    target_val: str = "data/arith/target_val.jsonl"
    target_test: str = "data/arith/target_test.jsonl"
    max_length: int = 128
    subtask_column: str = "task"  # target column naming the subtask (mean within, max across)
    label_free: bool = False  # ignore reference answers everywhere (needs a metric that needs none)


@dataclass
class WarmupSettings:
    fraction: float = 0.15
    epochs: int = 2
    lr: float = 3e-4
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0


@dataclass
class GradientSettings:
    batch_size: int = 8
    chunk_size: int = 32  # examples per file on disk (the unit of resuming and sharding)


@dataclass
class ProjectionSettings:
    kind: str = "sjlt"
    dim: int = 8192
    seed: int = 0
    nnz: int = 8  # sjlt non-zeros per coordinate (bench/bench_gradients.py measures the choice)


@dataclass
class RolloutSettings:
    k: int = 8
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.95
    max_new_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    batch_size: int = 256  # most sequences (prompts x samples) decoded together
    # most KV-cache positions per batch, rows x (longest prompt + max_new_tokens); the K samples of a
    # prompt share one prefill. Results do not depend on batch_size or max_batch_tokens.
    max_batch_tokens: int = 32768


@dataclass
class MetricSettings:
    name: str = "task_score"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicySettings:
    variant: str = "vanilla"  # vanilla | rejection | topk
    baseline: str = "mean"  # none | mean | loo
    topk: int = 4
    fallback_to_reference: bool = True
    token_normalize: bool = False  # divide each completion's NLL by its token count
    divide_by_kept: bool = True


@dataclass
class SelectionSettings:
    fraction: float = 0.1
    aggregate: str = "max_of_means"  # mean within subtask, max across subtasks ("mean" = mean over all)
    methods: list[str] = field(default_factory=lambda: ["less", "nice"])


@dataclass
class EvalSettings:
    fraction: float = 0.1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: ["random", "less", "nice", "full"])
    epochs: int = 3
    lr: float = 3e-4
    batch_size: int = 4
    max_new_tokens: int = 16
    max_test: int = 0  # 0 = all test prompts


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    seed: int = 0
    threads: int | str = "auto"
    device: str | None = None
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    gradients: GradientSettings = field(default_factory=GradientSettings)
    projection: ProjectionSettings = field(default_factory=ProjectionSettings)
    rollouts: RolloutSettings = field(default_factory=RolloutSettings)
    metric: MetricSettings = field(default_factory=MetricSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "RunConfig":
        return _build(cls, d, where)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Read a TOML config; relative data paths are resolved against the file's folder."""
        path = Path(path)
        try:
            d = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: invalid TOML: {err}") from None
        cfg = cls.from_dict(d, str(path))
        base = path.resolve().parent
        for name in ("pool", "target_val", "target_test"):
            value = getattr(cfg.data, name)
            if value and not Path(value).is_absolute() and not Path(value).exists():
                candidate = base / value
                if candidate.exists():
                    setattr(cfg.data, name, str(candidate))
        return cfg


def _build(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a table, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    defaults = cls()
    for name, value in d.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where} [{name}]")
        else:
            kwargs[name] = value
    return cls(**kwargs)
