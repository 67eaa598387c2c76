"""The run configuration: one dataclass, read from a TOML file with sections matching its fields.

Everything is checked when a config is read (:meth:`RunConfig.from_file`, :meth:`RunConfig.from_dict`)
or built in Python (:func:`validate_config`), before any model is loaded: the type, range and name
of every setting, and settings that contradict each other. Every problem is reported at once, each
naming the file and the setting (``configs/x.toml: [rollouts] stop: expected a list of strings, got
the string 'Answer'``), as a :class:`ConfigError`.

What the metric needs of each target record is checked by :func:`check_targets` once the records
are read, before any stage runs; :func:`metric_columns` builds the columns a metric receives.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from .data import REFERENCE_COLUMNS, DataError, Record
from .models import DEFAULT_MODEL, LoraSettings


@dataclass
class DataSettings:
    pool: str = "data/arith/pool.jsonl"
    target_val: str = "data/arith/target_val.jsonl"
    target_test: str = "data/arith/target_test.jsonl"
    max_length: int = 128
    subtask_column: str = "task"  # target column naming the subtask (mean within, max across); "" = one task
    label_free: bool = False  # ignore reference answers everywhere (needs a metric that needs none)
    # columns withheld from metrics in label-free mode (they hold reference answers)
    reference_columns: list[str] = field(default_factory=lambda: list(REFERENCE_COLUMNS))
    # nice_kit's column name -> the data's, e.g. {prompt = "instruction", response = "output", id = "idx"}
    columns: dict[str, str] = field(default_factory=dict)


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
    # a forward pass holds at most batch_size whole sequences' worth of token positions (several short NICE
    # completions sharing one prompt fit in one pass), and batch_size groups are projected at once;
    # lowered automatically on out-of-memory. batch_size and chunk_size change which examples share a
    # padded batch, so float sums run in another order: results agree only to rounding, not bit for bit.
    # Stated tolerance (tests/test_stale.py holds the code to it): stored float16 unit-vector entries move
    # by at most 1e-3 (a few float16 steps), scores by at most 1e-5. Measured on the bundled model (64 pool
    # examples, epoch 1): chunk_size 8 vs 32 changes 0.4% of the entries, by at most 3.1e-5, and mean
    # cosines by at most 4.3e-7; batch_size 3 vs 8 changes 0.09%, by at most 3.1e-5 (1.8e-7). Over the whole
    # bundled run, scores moved by up to 2.9e-6 (chunk_size 8 vs 32) and 1.2e-6 (batch_size 3 vs 8). Examples
    # whose scores tie to that precision may swap places in a ranking. Neither setting is part of any
    # stage's key: changing them reuses finished stages.
    batch_size: int = 8
    chunk_size: int = 32  # examples per file on disk (the unit of resuming and sharding); see batch_size


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
    # "nice_kit": nice_kit's estimator (variants vanilla | rejection | topk, baselines, the settings below);
    # "reference": the reference implementation's arithmetic (github.com/JTWang2000/NICE), variants
    # vanilla | rejection | hard_rejection | topk_rejection | topk_hard, with worst_case_protect and
    # do_normalize; baseline must be "none" and the nice_kit-only settings are not used (docs/method.md)
    estimator: str = "nice_kit"
    variant: str = "vanilla"  # nice_kit: vanilla | rejection | topk; reference: its five names
    baseline: str = "mean"  # none | mean | loo (nice_kit only)
    topk: int = 4  # nice_kit's topk variant (the reference's topk_* keep 10)
    fallback_to_reference: bool = True  # nice_kit's rejection
    token_normalize: bool = False  # divide each completion's NLL by its token count (nice_kit)
    divide_by_kept: bool = True  # nice_kit
    include_eos: bool = True  # the end-of-sequence token counts in a completion's NLL when the model sampled it (nice_kit)
    worst_case_protect: bool = False  # reference: a rejection variant that keeps nothing uses r_ref x grad NLL(ref)
    do_normalize: bool = False  # reference: mean instead of summed NLL per completion


@dataclass
class SelectionSettings:
    fraction: float = 0.1
    aggregate: str = "max_of_means"  # mean within subtask, max across subtasks ("mean" = mean over all)
    methods: list[str] = field(default_factory=lambda: ["less", "nice"])


@dataclass
class EvalSettings:
    fraction: float = 0.1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # fine-tuning seeds
    # selection seeds: each re-runs the selection with run seed + s (warmup subset, LoRA init, rollouts) and
    # projection seed + s, so results show the variance of the selection as well as of the fine-tuning
    selection_seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["random", "less", "nice", "full"])
    epochs: int = 3
    lr: float = 3e-4
    batch_size: int = 4
    max_new_tokens: int = 16
    max_test: int = 0  # 0 = all test prompts


class ConfigError(ValueError):
    """A bad setting. ``problems`` lists each one as ``"<file>: [section] setting: what is wrong"``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if len(self.problems) < 2 else
                         f"{len(self.problems)} problems in the config:\n  " + "\n  ".join(self.problems))


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
    def from_dict(cls, d: dict[str, Any], where: str = "config", check_model: bool = True) -> "RunConfig":
        """Build and validate a config from nested dicts (``where`` names it in errors).

        ``check_model=False`` skips checking that the model loads offline (for a config written on
        one machine to run on another)."""
        cfg, problems = _build(cls, d, where, "")
        if problems:
            raise ConfigError(problems)
        cfg._source = where
        validate_config(cfg, where, check_model=check_model)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None,
                  check_model: bool = True) -> "RunConfig":
        """Read and validate a TOML config; relative data and model paths are resolved against the
        file's folder when they do not exist from the working directory. ``overrides`` (nested
        dicts, a metric's ``params`` replaced whole) apply on top of the file before validation."""
        path = Path(path)
        try:
            d = tomllib.loads(path.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except UnicodeDecodeError as err:
            raise ConfigError([f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})"]) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError([f"{path}: invalid TOML: {err}"]) from None
        if overrides:
            d = merge_settings(d, overrides)
        cfg, problems = _build(cls, d, str(path), "")
        if problems:
            raise ConfigError(problems)
        base = path.resolve().parent
        for name in ("pool", "target_val", "target_test"):
            value = getattr(cfg.data, name)
            if isinstance(value, str) and value and not Path(value).is_absolute() and not Path(value).exists():
                candidate = base / value
                if candidate.exists():
                    setattr(cfg.data, name, str(candidate))
        model = cfg.model
        if isinstance(model, str) and model.startswith(("./", "../")) and not Path(model).exists() \
                and (base / model).exists():
            cfg.model = str(base / model)
        cfg._source = str(path)
        validate_config(cfg, str(path), check_model=check_model)
        return cfg


def config_source(cfg: RunConfig) -> str:
    """The file (or ``where``) a config was read from, for error messages; "config" if built in Python."""
    return getattr(cfg, "_source", "config")


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested settings ``over`` on top of ``base``; a metric's ``params`` are replaced, not merged."""
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("params", "columns")
        out[k] = merge_settings(out[k], v) if nested else v
    return out


def _label(section: str, name: str) -> str:
    return f"[{section}] {name}" if section else name


def _build(cls, d: Any, where: str, section: str) -> tuple[Any, list[str]]:
    """The dataclass ``cls`` from the table ``d``; problems with unknown names or non-tables."""
    if not isinstance(d, dict):
        what = f"[{section}]" if section else "the config"
        return cls(), [f"{where}: {what}: expected a table of settings, got {_describe(d)}"]
    known = {f.name: f for f in fields(cls)}
    problems = []
    unknown = [str(name) for name in d if name not in known]
    if unknown:
        hints = [f"{name!r} -> {near[0]!r}" for name in unknown
                 for near in [difflib.get_close_matches(name, list(known), n=1)] if near]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        at = f"[{section}]: " if section else ""
        problems.append(f"{where}: {at}unknown setting(s) {unknown}{hint}; known: {', '.join(known)}")
    kwargs = {}
    defaults = cls()
    for name, value in d.items():
        if name not in known:
            continue
        default = getattr(defaults, name)
        if is_dataclass(default):
            kwargs[name], sub = _build(type(default), value, where, name)
            problems += sub
        else:
            kwargs[name] = value
    return cls(**kwargs), problems


# ------------------------------------------------------------------------------------------------
# Types


_ARTICLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "nothing"}
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _describe(value: Any) -> str:
    """A value as the error messages show it: ``the string 'Answer'``, ``the integer 0``."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return f"the list {list(value)!r}"
    if isinstance(value, dict):
        return f"the table {value!r}"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def _expected(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is list:
        inner = args[0] if args else Any
        return f"a list of {_PLURAL.get(inner, 'values')}"
    if origin is dict:
        inner = args[1] if len(args) > 1 else Any
        return f"a table of {_PLURAL.get(inner, 'values')}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return _ARTICLE.get(hint, getattr(hint, "__name__", str(hint)))


def _is(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (an int is a float; a bool is not an int)."""
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_is(x, args[0]) for x in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict) and all(_is(k, args[0]) and _is(v, args[1]) for k, v in value.items()) \
            if args else isinstance(value, dict)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a type this checker does not know: accept


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved: check nothing rather than fail
        return {}


# ------------------------------------------------------------------------------------------------
# Ranges and names


def _at_least(n: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be at least {n}, got {v!r}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be greater than 0, got {v!r}"


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else f"must be a fraction in (0, 1] (1 = all), got {v!r}"


def _unit_interval_open(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"must be at least 0 and below 1, got {v!r}"


def _non_empty(v: Any) -> str | None:
    return None if len(v) else "must not be empty"


def _non_empty_strings(v: Any) -> str | None:
    bad = [x for x in v if x == ""]  # whitespace is a real stop string ("\n" is a common one)
    return f"holds an empty string ({list(v)!r})" if bad else None


def _choices(get: Callable[[], tuple[str, ...]]) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        names = tuple(get())
        values = [v] if isinstance(v, str) else list(v)
        bad = [x for x in values if x not in names]
        if not bad:
            return None
        near = difflib.get_close_matches(str(bad[0]), names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"unknown {', '.join(map(repr, bad))}{hint}; choose from {', '.join(names)}"

    return check


def _threads(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v == "auto" else f"must be a positive integer or \"auto\", got {_describe(v)}"
    return _at_least(1)(v)


def _device(v: Any) -> str | None:
    if v is None:
        return None
    import torch

    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return f"not a torch device: {v!r} (cpu, cuda, cuda:1, mps ...)"
    return None


def _column_mapping(v: dict) -> str | None:
    if any(not k.strip() or not x.strip() for k, x in v.items()):
        return f"maps nice_kit's column names to yours with non-empty names, got {v!r}"
    if len(set(v.values())) != len(v):
        return f"reads one of your columns twice: {v!r}"
    return None


def _projection_kinds() -> tuple[str, ...]:
    from .projection import KINDS

    return KINDS


def _variants() -> tuple[str, ...]:
    from .policy import ALL_VARIANTS

    return ALL_VARIANTS


def _estimators() -> tuple[str, ...]:
    from .policy import ESTIMATORS

    return ESTIMATORS


def _baselines() -> tuple[str, ...]:
    from .policy import BASELINES

    return BASELINES


def _aggregates() -> tuple[str, ...]:
    from .influence import AGGREGATES

    return AGGREGATES


def _selection_methods() -> tuple[str, ...]:
    from .measurements import BUILTIN

    return tuple(BUILTIN)


def _eval_methods() -> tuple[str, ...]:
    from .evaluation import EVAL_METHODS

    return EVAL_METHODS


_PATH_SETTINGS = {("", "model"), ("data", "pool"), ("data", "target_val"), ("data", "target_test")}

# (section, setting) -> checks of its value once its type is right; a setting not listed here (one
# added later) still has its type checked against the dataclass annotation
RULES: dict[tuple[str, str], tuple[Callable[[Any], str | None], ...]] = {
    ("", "model"): (_non_empty,),
    ("", "seed"): (_at_least(0),),
    ("", "threads"): (_threads,),
    ("", "device"): (_device,),
    ("data", "pool"): (_non_empty,),
    ("data", "target_val"): (_non_empty,),
    ("data", "target_test"): (_non_empty,),
    ("data", "max_length"): (_at_least(8),),
    ("data", "reference_columns"): (_non_empty_strings,),
    ("data", "columns"): (_column_mapping,),
    ("lora", "r"): (_at_least(1),),
    ("lora", "alpha"): (_positive,),
    ("lora", "dropout"): (_unit_interval_open,),
    ("lora", "target_modules"): (_non_empty, _non_empty_strings),
    ("warmup", "fraction"): (_fraction,),
    ("warmup", "epochs"): (_at_least(1),),
    ("warmup", "lr"): (_positive,),
    ("warmup", "batch_size"): (_at_least(1),),
    ("warmup", "grad_accum"): (_at_least(1),),
    ("warmup", "warmup_ratio"): (_unit_interval_open,),
    ("warmup", "weight_decay"): (_at_least(0),),
    ("gradients", "batch_size"): (_at_least(1),),
    ("gradients", "chunk_size"): (_at_least(1),),
    ("projection", "kind"): (_choices(_projection_kinds),),
    ("projection", "dim"): (_at_least(1),),
    ("projection", "seed"): (_at_least(0),),
    ("projection", "nnz"): (_at_least(1),),
    ("rollouts", "k"): (_at_least(1),),
    ("rollouts", "temperature"): (_positive,),
    ("rollouts", "top_k"): (_at_least(0),),
    ("rollouts", "top_p"): (_fraction,),
    ("rollouts", "max_new_tokens"): (_at_least(1),),
    ("rollouts", "stop"): (_non_empty_strings,),
    ("rollouts", "batch_size"): (_at_least(1),),
    ("rollouts", "max_batch_tokens"): (_at_least(1),),
    ("policy", "estimator"): (_choices(_estimators),),
    ("policy", "variant"): (_choices(_variants),),
    ("policy", "baseline"): (_choices(_baselines),),
    ("policy", "topk"): (_at_least(1),),
    ("selection", "fraction"): (_fraction,),
    ("selection", "aggregate"): (_choices(_aggregates),),
    ("selection", "methods"): (_non_empty, _choices(_selection_methods)),
    ("evaluation", "fraction"): (_fraction,),
    ("evaluation", "seeds"): (_non_empty, lambda v: None if all(s >= 0 for s in v) else f"must be >= 0, got {v!r}"),
    ("evaluation", "methods"): (_non_empty, _choices(_eval_methods)),
    ("evaluation", "epochs"): (_at_least(1),),
    ("evaluation", "lr"): (_positive,),
    ("evaluation", "batch_size"): (_at_least(1),),
    ("evaluation", "max_new_tokens"): (_at_least(1),),
    ("evaluation", "max_test"): (_at_least(0),),
}


def _check_fields(obj: Any, section: str) -> tuple[list[tuple[str, str]], set[str]]:
    """(setting, problem) for every field of the dataclass ``obj``; and the names whose type is wrong."""
    problems, bad = [], set()
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            continue
        hint = hints.get(f.name, Any)
        if section == "metric" and f.name == "name" and callable(value):
            continue  # a metric given as a function (Python only)
        if (section, f.name) in _PATH_SETTINGS and isinstance(value, os.PathLike):
            value = os.fspath(value)  # a pathlib.Path where a path is expected (Python only)
        if not _is(value, hint):
            problems.append((_label(section, f.name), f"expected {_expected(hint)}, got {_describe(value)}"))
            bad.add(f.name)
            continue
        for rule in RULES.get((section, f.name), ()):
            msg = rule(value)
            if msg:
                problems.append((_label(section, f.name), msg))
                bad.add(f.name)
                break
    return problems, bad


def validate_config(cfg: RunConfig, where: str | None = None, check_model: bool = True) -> None:
    """Check every setting of ``cfg`` (also one built or edited in Python); raise :class:`ConfigError`
    listing every problem, each naming ``where`` (default: the file ``cfg`` was read from) and the
    setting. Loads no model: with ``check_model`` it only checks that the model loads offline."""
    where = where or config_source(cfg)
    problems, bad = _check_fields(cfg, "")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            sub, sub_bad = _check_fields(value, f.name)
            problems += sub
            bad |= {f"{f.name}.{n}" for n in sub_bad}
    problems += _cross_checks(cfg, bad)
    if check_model and "model" not in bad:
        from .models import check_model as model_problem

        try:
            model_problem(os.fspath(cfg.model))
        except FileNotFoundError as err:  # models.ModelNotAvailable
            problems.append(("model", str(err)))
    if problems:
        raise ConfigError([f"{where}: {setting}: {msg}" for setting, msg in problems])


def _metric_problems(cfg: RunConfig, bad: set[str]) -> list[tuple[str, str]]:
    m = cfg.metric
    if "metric.name" in bad or "metric.params" in bad or callable(m.name):
        return []
    from .metrics import metric_info

    try:
        info = metric_info(m.name)
    except KeyError:
        from .metrics.registry import _REGISTRY

        near = difflib.get_close_matches(m.name, list(_REGISTRY), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        return [("[metric] name", f"unknown metric {m.name!r}; {hint}registered: {', '.join(sorted(_REGISTRY))}")]
    known_names = not set(m.params) - set(info.params)
    out = _param_types(info, m.params) if known_names else []
    if not out:  # unknown names first, then the metric's own check (given the right types)
        out = [("[metric] params", msg) for msg in info.param_problems(m.params)]
    if cfg.data.label_free and "data.reference_columns" not in bad:
        reads = sorted(set(info.needed_columns(m.params)) & set(cfg.data.reference_columns))
        if info.needs_reference or reads:
            what = f" (it reads {', '.join(reads)})" if reads else ""
            out.append(("[data] label_free", f"label-free mode withholds reference answers, but the metric {m.name!r} "
                                             f"needs them{what}; choose a metric that needs no reference "
                                             "(nice-kit metrics lists them) or set label_free = false"))
    return out


def _param_types(info, params: dict[str, Any]) -> list[tuple[str, str]]:
    """Each given parameter against the factory's annotation (or its default's type)."""
    try:
        hints = typing.get_type_hints(info.factory)
    except Exception:
        hints = {}
    out = []
    for name, value in params.items():
        hint = hints.get(name)
        if hint is None:
            default = info.params.get(name)
            hint = type(default) if isinstance(default, (bool, int, float, str)) else Any
        if not _is(value, hint):
            out.append((f"[metric] params.{name}", f"expected {_expected(hint)}, got {_describe(value)}"))
    return out


def _cross_checks(cfg: RunConfig, bad: set[str]) -> list[tuple[str, str]]:
    """Settings that are fine alone but contradict each other (or the registered metric)."""
    out = _metric_problems(cfg, bad)
    p, r, d = cfg.projection, cfg.rollouts, cfg.data
    if not bad & {"projection.kind", "projection.dim", "projection.nnz"} and p.kind == "sjlt":
        if p.dim % p.nnz:
            out.append(("[projection] nnz", f"the sjlt projection needs nnz to divide dim; dim = {p.dim} is not a "
                                            f"multiple of nnz = {p.nnz}"))
    pol = cfg.policy
    if not bad & {"policy.estimator", "policy.variant", "policy.baseline"}:
        out.extend(_estimator_problems(pol, d.label_free))
    own = pol.estimator == "nice_kit" and "policy.estimator" not in bad  # the checks below are of nice_kit's estimator
    if own and d.label_free and not bad & {"policy.variant", "data.label_free"} and pol.variant == "rejection":
        out.append(("[policy] variant", "the rejection variant compares completions with the reference answer's "
                                        "reward; a label-free run has none (use vanilla or topk)"))
    if own and not bad & {"policy.variant", "policy.topk", "rollouts.k"} and pol.variant == "topk" and pol.topk > r.k:
        out.append(("[policy] topk", f"keeps the best {pol.topk} of rollouts.k = {r.k} completions; it must be at "
                                     "most k"))
    if own and not bad & {"policy.variant", "policy.baseline", "rollouts.k"} and pol.variant == "vanilla" \
            and pol.baseline != "none" and r.k < 2:
        out.append(("[rollouts] k", f"the {pol.baseline!r} baseline needs at least 2 completions per prompt (with "
                                    "one, every weight is 0); raise k or set policy.baseline = \"none\""))
    if d.label_free and "selection.methods" not in bad and set(cfg.selection.methods) <= {"less"}:
        out.append(("[selection] methods", "LESS needs reference answers, and this run is label-free; add \"nice\""))
    return out


def _estimator_problems(pol: PolicySettings, label_free: bool) -> list[tuple[str, str]]:
    """The variant and baseline must be the chosen estimator's."""
    from .policy import REFERENCE_VARIANTS, VARIANTS

    if pol.estimator == "reference":
        out = []
        if pol.variant not in REFERENCE_VARIANTS:
            out.append(("[policy] variant", f"the reference estimator's variants are {list(REFERENCE_VARIANTS)}, "
                                            f"not {pol.variant!r} (nice_kit's topk is estimator = \"nice_kit\")"))
        if pol.baseline != "none":
            out.append(("[policy] baseline", f"the reference estimator subtracts no baseline; set baseline = \"none\" "
                                             f"(or estimator = \"nice_kit\" to keep {pol.baseline!r})"))
        if pol.token_normalize:
            out.append(("[policy] token_normalize", "is nice_kit's; the reference estimator's equivalent is "
                                                    "do_normalize = true"))
        if label_free and pol.variant in ("hard_rejection", "topk_hard"):
            out.append(("[policy] variant", f"the reference's {pol.variant} compares completions with the reference "
                                            "answer's reward; a label-free run has none (use vanilla, rejection or "
                                            "topk_rejection)"))
        if label_free and pol.worst_case_protect and pol.variant != "vanilla":
            out.append(("[policy] worst_case_protect", "falls back to the reference answer; a label-free run has none"))
        return out
    if pol.variant not in VARIANTS:
        return [("[policy] variant", f"{pol.variant!r} is a variant of the reference estimator: set estimator = "
                                     f"\"reference\" (nice_kit's own variants are {list(VARIANTS)}; its rejection "
                                     "keeps ties with the reference answer like the reference's hard_rejection)")]
    return []


# ------------------------------------------------------------------------------------------------
# What a metric reads of the target records


def metric_columns(records: list[Record], cfg: RunConfig) -> tuple[dict[str, list[Any]], list[str], list[str]]:
    """The ``**columns`` a metric receives for ``records`` (one list entry per record), the names
    passed, and the names withheld. In label-free mode the ``data.reference_columns`` are withheld
    and no ``response`` is passed; otherwise every column is passed, with ``response`` (the reference
    response)."""
    names = sorted({k for r in records for k in r.columns})
    withheld = [n for n in names if n in set(cfg.data.reference_columns)] if cfg.data.label_free else []
    cols = {n: [r.columns.get(n) for r in records] for n in names if n not in withheld}
    if not cfg.data.label_free:
        cols["response"] = [r.response for r in records]
    return cols, sorted(cols), withheld


def check_targets(records: list[Record], cfg: RunConfig, path: str | Path | None = None,
                  where: str | None = None) -> None:
    """Check what the run needs of each target record before any stage runs: every column the
    metric reads (registered metrics), the metric's own record check (``task_score``: a task with a
    scorer), and ``data.subtask_column``. Raises :class:`DataError` naming file:line (or row) and the
    column, or :class:`ConfigError` when ``subtask_column`` is on no record at all (a typo).
    ``where`` names the config in that error (default: the file it was read from)."""
    path = str(path) if path is not None else "target records"
    problems: list[str] = []

    def at(i: int, rec: Record) -> str:
        return f"{rec.origin or f'{path}: record {i}'} (id {rec.id})"

    m = cfg.metric
    if isinstance(m.name, str):
        from .metrics import metric_info

        info = metric_info(m.name)
        needed = info.needed_columns(m.params)
        cols, passed, withheld = metric_columns(records, cfg)
        for i, rec in enumerate(records):
            row = {n: cols[n][i] for n in passed}
            missing = [c for c in needed if row.get(c) is None]
            if missing:
                have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
                problems.append(f"{at(i, rec)}: no column {', '.join(map(repr, missing))}, which the metric "
                                f"{m.name!r} reads (the record has: {have})")
                continue
            problems += [f"{at(i, rec)}: {msg}" for msg in info.record_problems(m.params, row)]
    col = cfg.data.subtask_column
    if col:
        has = [col in r.columns and r.columns[col] is not None for r in records]
        if not any(has) and col != DataSettings.subtask_column:
            names = sorted({k for r in records for k in r.columns})
            near = difflib.get_close_matches(col, names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError([f"{where or config_source(cfg)}: [data] subtask_column: no record of {path} has the column "
                               f"{col!r}; {hint}the records have {', '.join(names) or 'no extra columns'} "
                               '(subtask_column = "" treats all prompts as one task)'])
        if any(has):
            problems += [f"{at(i, r)}: no {col!r} column (data.subtask_column), which the other records have"
                         for i, (r, ok) in enumerate(zip(records, has)) if not ok]
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{len(problems)} problems in the target records:\n  " + "\n  ".join(problems[:10]) + more)
