"""Every setting of a run, with its type, range and help text, and every set of names a setting
chooses from: the bottom layer of nice_kit.

This module imports the standard library and pydantic only: nothing else of nice_kit, and no torch.
The settings are plain dataclasses (built, edited and compared like any dataclass); their types and
ranges are declared with pydantic (``Annotated[int, Field(ge=1)]``, ``Literal[...]``) and checked by
:func:`check_settings`, which returns every problem at once in nice_kit's words
(``[rollouts] stop: expected a list of strings, got the string 'Answer'``). Each setting's help text
is declared once, as the field's ``description``: ``nice-kit config --help`` and ``docs/settings.md``
show it (:func:`settings_reference`).

Checks that need the metric registry or the model files are not here: :mod:`nice_kit.config` adds
them (and reads TOML files).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

# ------------------------------------------------------------------------------------------------
# The names settings choose from (the modules that implement each re-export them)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# columns that hold reference answers (withheld from metrics in label-free mode)
REFERENCE_COLUMNS = ("answer", "tests", "test", "canonical_solution", "solution", "baseline", "reference")
PROJECTION_KINDS = ("sjlt", "rademacher")
ESTIMATORS = ("nice_kit", "reference")  # nice_kit's own estimator, or the reference implementation's arithmetic
VARIANTS = ("vanilla", "rejection", "topk")  # nice_kit's estimator
REFERENCE_VARIANTS = ("vanilla", "rejection", "hard_rejection", "topk_rejection", "topk_hard")
ALL_VARIANTS = tuple(dict.fromkeys(VARIANTS + REFERENCE_VARIANTS))
BASELINES = ("none", "mean", "loo")
AGGREGATES = ("max_of_means", "mean")
SELECTION_METHODS = ("less", "nice")  # the built-in measurements (nice_kit.measurements.BUILTIN)
EVAL_METHODS = ("random", "less", "nice", "full")
# torch's device types (torch.device accepts these, optionally with ":<index>"); checked without torch
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "xla", "meta", "hpu", "mtia", "ipu", "ve", "lazy", "fpga", "maia",
                "ort", "vulkan", "mkldnn", "opengl", "opencl", "ideep", "hip", "msnpu", "privateuseone")

# strict: an integer setting refuses "8" and true (TOML and Python alike); a number accepts an integer.
# revalidate_instances: check_settings re-checks a config edited in Python.
_STRICT = ConfigDict(strict=True, revalidate_instances="always")


# ------------------------------------------------------------------------------------------------
# Checks that are more than a type and a range (their messages are the ones users see)


def _fail(message: str) -> typing.NoReturn:
    raise PydanticCustomError("nice_kit", message)


def _no_empty_strings(v: list[str]) -> list[str]:
    if any(x == "" for x in v):  # whitespace is a real stop string ("\n" is a common one)
        _fail(f"holds an empty string ({list(v)!r})")
    return v


def _threads(v: int | str) -> int | str:
    if isinstance(v, str) and v != "auto":
        _fail(f'must be a positive integer or "auto", got {describe(v)}')
    if isinstance(v, int) and v < 1:
        _fail(f"must be at least 1, got {v!r}")
    return v


def _device(v: str | None) -> str | None:
    if v is None:
        return v
    kind, _, index = v.partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (_ and not index):
        _fail(f"not a torch device: {v!r} (cpu, cuda, cuda:1, mps ...)")
    return v


def _column_mapping(v: dict[str, str]) -> dict[str, str]:
    if any(not k.strip() or not x.strip() for k, x in v.items()):
        _fail(f"maps nice_kit's column names to yours with non-empty names, got {v!r}")
    if len(set(v.values())) != len(v):
        _fail(f"reads one of your columns twice: {v!r}")
    return v


NonEmptyStrings = Annotated[list[str], Field(min_length=1), AfterValidator(_no_empty_strings)]
Fraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1], 1 = all
Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]


def _names(names: tuple[str, ...]) -> Any:
    return Literal[names]  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------------------
# The settings


@dataclass
class DataSettings:
    """``[data]``: where the pool and the target prompts are, and how to read them."""
    __pydantic_config__ = _STRICT

    pool: Annotated[str, Field(min_length=1, description="the candidate training examples (JSONL)")] = \
        "data/arith/pool.jsonl"
    target_val: Annotated[str, Field(min_length=1, description="target prompts the scores are computed on (JSONL)")] = \
        "data/arith/target_val.jsonl"
    target_test: Annotated[str, Field(min_length=1, description="held-out target prompts for evaluation (JSONL)")] = \
        "data/arith/target_test.jsonl"
    max_length: Annotated[int, Field(ge=8, description="longest tokenised example; longer ones are truncated")] = 128
    subtask_column: Annotated[str, Field(description="target column naming the subtask (mean within, max across); "
                                                     "\"\" = one task")] = "task"
    label_free: Annotated[bool, Field(description="ignore reference answers everywhere (needs a metric that needs "
                                                  "none)")] = False
    reference_columns: Annotated[list[str], AfterValidator(_no_empty_strings), Field(
        description="columns withheld from metrics in label-free mode (they hold reference answers)")] = \
        field(default_factory=lambda: list(REFERENCE_COLUMNS))
    columns: Annotated[dict[str, str], AfterValidator(_column_mapping), Field(
        description="nice_kit's column name -> the data's, e.g. {prompt = \"instruction\", response = \"output\", "
                    "id = \"idx\"}")] = field(default_factory=dict)


@dataclass
class LoraSettings:
    """``[lora]``: the LoRA adapter trained in the warmup and differentiated in every gradient."""
    __pydantic_config__ = _STRICT

    r: Annotated[int, Field(ge=1, description="LoRA rank")] = 8
    alpha: Annotated[int, Field(gt=0, description="LoRA alpha (scale alpha / r)")] = 32
    dropout: Annotated[float, Field(ge=0, lt=1, description="LoRA dropout")] = 0.1
    target_modules: Annotated[NonEmptyStrings, Field(description="module names the adapter wraps")] = \
        field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class WarmupSettings:
    """``[warmup]``: the short LoRA fine-tuning on a random part of the pool whose checkpoints are scored."""
    __pydantic_config__ = _STRICT

    fraction: Annotated[Fraction, Field(description="share of the pool trained on")] = 0.15
    epochs: Annotated[Count, Field(description="epochs; one checkpoint per epoch")] = 2
    lr: Annotated[Positive, Field(description="peak learning rate")] = 3e-4
    batch_size: Annotated[Count, Field(description="examples per step")] = 4
    grad_accum: Annotated[Count, Field(description="steps accumulated per optimizer update")] = 1
    warmup_ratio: Annotated[float, Field(ge=0, lt=1, description="share of steps with a rising learning rate")] = 0.03
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay")] = 0.0


@dataclass
class GradientSettings:
    """``[gradients]``: how per-example gradients are computed (speed only: no stage's key)."""
    __pydantic_config__ = _STRICT

    # batch_size and chunk_size change which examples share a padded batch, so float sums run in another
    # order: results agree only to rounding, not bit for bit. Stated tolerance (tests/test_stale.py holds the
    # code to it): stored float16 unit-vector entries move by at most 1e-3 (a few float16 steps), scores by at
    # most 1e-5. Measured on the bundled model (64 pool examples, epoch 1): chunk_size 8 vs 32 changes 0.4% of
    # the entries, by at most 3.1e-5, and mean cosines by at most 4.3e-7; batch_size 3 vs 8 changes 0.09%, by
    # at most 3.1e-5 (1.8e-7). Over the whole bundled run, scores moved by up to 2.9e-6 (chunk_size 8 vs 32)
    # and 1.2e-6 (batch_size 3 vs 8). Examples whose scores tie to that precision may swap places in a ranking.
    batch_size: Annotated[Count, Field(
        description="a forward pass holds at most batch_size whole sequences' worth of token positions, and "
                    "batch_size groups are projected at once; halved on out-of-memory. Results agree to rounding "
                    "(scores within 1e-5), not bit for bit, across batch sizes")] = 8
    chunk_size: Annotated[Count, Field(
        description="examples per file on disk (the unit of resuming and sharding); like batch_size, changes "
                    "results only by rounding")] = 32


@dataclass
class ProjectionSettings:
    """``[projection]``: the random projection of every gradient to ``dim`` numbers."""
    __pydantic_config__ = _STRICT

    kind: Annotated[_names(PROJECTION_KINDS), Field(description="sjlt (sparse, fast) or rademacher (dense)")] = "sjlt"
    dim: Annotated[Count, Field(description="projected dimension")] = 8192
    seed: Annotated[int, Field(ge=0, description="the projection's seed")] = 0
    nnz: Annotated[Count, Field(description="sjlt non-zeros per coordinate; must divide dim "
                                            "(bench/bench_gradients.py measures the choice)")] = 8


@dataclass
class RolloutSettings:
    """``[rollouts]``: the completions sampled from the model for each target prompt (NICE)."""
    __pydantic_config__ = _STRICT

    k: Annotated[Count, Field(description="completions sampled per target prompt")] = 8
    temperature: Annotated[Positive, Field(description="sampling temperature")] = 1.0
    top_k: Annotated[int, Field(ge=0, description="sample among the k most likely tokens (0 = all)")] = 50
    top_p: Annotated[Fraction, Field(description="nucleus sampling mass")] = 0.95
    max_new_tokens: Annotated[Count, Field(description="longest completion, in tokens")] = 16
    stop: Annotated[list[str], AfterValidator(_no_empty_strings), Field(
        description="strings that end a completion (whitespace such as \"\\n\" is allowed)")] = \
        field(default_factory=list)
    batch_size: Annotated[Count, Field(description="most sequences (prompts x samples) decoded together; results "
                                                   "do not depend on it")] = 256
    max_batch_tokens: Annotated[Count, Field(
        description="most KV-cache positions per batch, rows x (longest prompt + max_new_tokens); the k samples "
                    "of a prompt share one prefill. Results do not depend on it")] = 32768


@dataclass
class MetricSettings:
    """``[metric]``: the reward each completion gets (``nice-kit metrics`` lists the registered ones)."""
    __pydantic_config__ = _STRICT

    name: Annotated[str, Field(description="a registered metric's name (in Python also a function "
                                           "reward(prompts, completions, **columns) -> list[float])")] = "task_score"
    params: Annotated[dict[str, Any], Field(description="the metric's parameters, e.g. { max_words = 3 }")] = \
        field(default_factory=dict)


@dataclass
class PolicySettings:
    """``[policy]``: how NICE turns rewards into a policy-gradient direction (docs/method.md)."""
    __pydantic_config__ = _STRICT

    estimator: Annotated[_names(ESTIMATORS), Field(
        description="\"nice_kit\": nice_kit's estimator (variants vanilla | rejection | topk, baselines, the "
                    "nice_kit settings below); \"reference\": the reference implementation's arithmetic "
                    "(github.com/JTWang2000/NICE), its five variants, worst_case_protect and do_normalize; "
                    "baseline must be \"none\"")] = "nice_kit"
    variant: Annotated[_names(ALL_VARIANTS), Field(
        description="nice_kit: vanilla | rejection | topk; reference: vanilla | rejection | hard_rejection | "
                    "topk_rejection | topk_hard")] = "vanilla"
    baseline: Annotated[_names(BASELINES), Field(description="reward baseline per prompt: none | mean | loo "
                                                             "(nice_kit only)")] = "mean"
    topk: Annotated[Count, Field(description="nice_kit's topk variant keeps the best topk completions (the "
                                             "reference's topk_* keep 10)")] = 4
    fallback_to_reference: Annotated[bool, Field(description="nice_kit's rejection: use the reference answer when "
                                                             "no completion beats it")] = True
    token_normalize: Annotated[bool, Field(description="divide each completion's NLL by its token count "
                                                       "(nice_kit)")] = False
    divide_by_kept: Annotated[bool, Field(description="average over the kept completions rather than all k "
                                                      "(nice_kit)")] = True
    include_eos: Annotated[bool, Field(description="the end-of-sequence token counts in a completion's NLL when "
                                                   "the model sampled it (nice_kit)")] = True
    worst_case_protect: Annotated[bool, Field(description="reference: a rejection variant that keeps nothing uses "
                                                          "r_ref x grad NLL(ref)")] = False
    do_normalize: Annotated[bool, Field(description="reference: mean instead of summed NLL per completion")] = False


@dataclass
class SelectionSettings:
    """``[selection]``: which examples are chosen from the scores."""
    __pydantic_config__ = _STRICT

    fraction: Annotated[Fraction, Field(description="share of the pool selected")] = 0.1
    aggregate: Annotated[_names(AGGREGATES), Field(description="over target prompts: mean within subtask, max "
                                                               "across subtasks (\"mean\" = mean over all)")] = \
        "max_of_means"
    methods: Annotated[list[_names(SELECTION_METHODS)], Field(min_length=1, description="the measurements "
                                                                                        "scored")] = \
        field(default_factory=lambda: ["less", "nice"])


@dataclass
class EvalSettings:
    """``[evaluation]``: fine-tuning on each selection and scoring the held-out test prompts."""
    __pydantic_config__ = _STRICT

    fraction: Annotated[Fraction, Field(description="share of the pool each selection fine-tunes on")] = 0.1
    seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, description="fine-tuning seeds")] = \
        field(default_factory=lambda: [0, 1, 2])
    selection_seeds: Annotated[list[Annotated[int, Field(ge=0)]], Field(
        description="selection seeds: each re-runs the selection with run seed + s (warmup subset, LoRA init, "
                    "rollouts) and projection seed + s, so results show the variance of the selection as well as "
                    "of the fine-tuning")] = field(default_factory=lambda: [0])
    methods: Annotated[list[_names(EVAL_METHODS)], Field(min_length=1, description="what is fine-tuned on")] = \
        field(default_factory=lambda: ["random", "less", "nice", "full"])
    epochs: Annotated[Count, Field(description="fine-tuning epochs")] = 3
    lr: Annotated[Positive, Field(description="fine-tuning learning rate")] = 3e-4
    batch_size: Annotated[Count, Field(description="fine-tuning examples per step")] = 4
    max_new_tokens: Annotated[Count, Field(description="longest test completion, in tokens")] = 16
    max_test: Annotated[int, Field(ge=0, description="test prompts scored (0 = all)")] = 0


@dataclass
class RunSettings:
    """A whole run's settings: the top-level ones and one table per section. :class:`nice_kit.config.RunConfig`
    adds reading them from TOML and the checks that need the metric registry and the model files."""
    __pydantic_config__ = _STRICT

    model: Annotated[str, Field(min_length=1, description="a local model folder or a name that works offline "
                                                         "(SmolLM2-135M-Instruct)")] = DEFAULT_MODEL
    seed: Annotated[int, Field(ge=0, description="the run's seed (warmup subset, LoRA init, rollouts)")] = 0
    threads: Annotated[int | str, AfterValidator(_threads), Field(description="CPU threads, or \"auto\"")] = "auto"
    device: Annotated[str | None, AfterValidator(_device), Field(description="cpu, cuda, cuda:1, mps ...; unset = "
                                                                             "the best available")] = None
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


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunSettings)  # type: ignore[misc]
                             if f.default_factory is not dataclasses.MISSING}


class ConfigError(ValueError):
    """A bad setting. ``problems`` lists each one as ``"<file>: [section] setting: what is wrong"``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if len(self.problems) < 2 else
                         f"{len(self.problems)} problems in the config:\n  " + "\n  ".join(self.problems))


# ------------------------------------------------------------------------------------------------
# Building settings from tables (unknown names are found here; types and ranges by check_settings)


def label(section: str, name: str) -> str:
    """``[section] name``, or ``name`` for a top-level setting."""
    return f"[{section}] {name}" if section else name


def build(cls: type, d: Any, where: str, section: str = "") -> tuple[Any, list[str]]:
    """The settings dataclass ``cls`` from the table ``d`` (values unchecked); the problems with
    unknown names (with "did you mean") and with sections that are not tables."""
    if not isinstance(d, dict):
        what = f"[{section}]" if section else "the config"
        return cls(), [f"{where}: {what}: expected a table of settings, got {describe(d)}"]
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
    for name, value in d.items():
        if name not in known:
            continue
        sub = SECTIONS.get(name) if not section else None
        if sub is not None:
            kwargs[name], more = build(sub, value, where, name)
            problems += more
        else:
            kwargs[name] = value
    return cls(**kwargs), problems


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested settings ``over`` on top of ``base``; a metric's ``params`` are replaced, not merged."""
    out = dict(base)
    for k, v in over.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("params", "columns")
        out[k] = merge_settings(out[k], v) if nested else v
    return out


def dotted_overrides(pairs: typing.Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """``[("policy.baseline", "none"), ("metric.params.max_words", 3)]`` as nested tables for
    :func:`apply_overrides`."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {key}: {'.'.join(path)} is a setting, not a table"])
        node[leaf] = value
    return out


def apply_overrides(d: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Like :func:`merge_settings`, but ``params`` and ``columns`` tables are merged key by key (the
    CLI's ``--set metric.params.max_words=3`` changes one parameter)."""
    out = dict(d)
    for k, v in over.items():
        out[k] = apply_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------------
# Checking settings: types and ranges (pydantic), then settings that contradict each other


_ARTICLE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "nothing"}
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
_TYPE_ERRORS = {"int_type", "int_from_float", "float_type", "string_type", "bool_type", "list_type", "dict_type",
                "model_type", "dataclass_type", "dataclass_exact_type", "none_required", "is_instance_of"}


def describe(value: Any) -> str:
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


def _bare(hint: Any) -> Any:
    """``hint`` without its ``Annotated`` metadata (recursively), Literals as their values' type."""
    if typing.get_origin(hint) is Annotated:
        return _bare(typing.get_args(hint)[0])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return type(args[0])
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_bare(a) for a in args)]
    if origin in (list, dict):
        return origin[tuple(_bare(a) for a in args)] if args else origin
    return hint


def expected(hint: Any) -> str:
    """What a type hint asks for, in words: ``a list of strings``, ``one of 'strict', 'last_number'``."""
    if typing.get_origin(hint) is Annotated:
        return expected(typing.get_args(hint)[0])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(expected(a) for a in args)
    if origin is list:
        inner = _bare(args[0]) if args else Any
        return f"a list of {_PLURAL.get(inner, 'values')}"
    if origin is dict:
        inner = _bare(args[1]) if len(args) > 1 else Any
        return f"a table of {_PLURAL.get(inner, 'values')}"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    return _ARTICLE.get(hint, getattr(hint, "__name__", str(hint)))


def _constraints(hint: Any) -> dict[str, Any]:
    """The declared bounds of a hint: ``{"ge": 1}``, ``{"gt": 0, "le": 1}``, ``{"min_length": 1}``."""
    out: dict[str, Any] = {}
    for m in _metadata(hint):
        for c in getattr(m, "metadata", [m]):
            for name in ("gt", "ge", "lt", "le", "min_length"):
                if isinstance(c, getattr(annotated_types, {"min_length": "MinLen"}.get(name, name.title()))):
                    out.setdefault(name, getattr(c, name))
    return out


def _choices(hint: Any) -> tuple[Any, ...]:
    """The names a ``Literal`` hint (or a list of one) allows."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is list:
        return _choices(typing.get_args(hint)[0])
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def range_text(hint: Any) -> str:
    """A hint's bounds in words (``at least 1``, ``a fraction in (0, 1] (1 = all)``), or ""."""
    c = _constraints(hint)
    if c.get("gt") == 0 and c.get("le") == 1:
        return "a fraction in (0, 1] (1 = all)"
    if c.get("ge") == 0 and c.get("lt") == 1:
        return "at least 0 and below 1"
    if "ge" in c:
        return f"at least {c['ge']}"
    if "gt" in c:
        return f"greater than {c['gt']}"
    if c.get("min_length") == 1:
        return "not empty"
    return ""


def _field_problem(hint: Any, value: Any, errors: list[dict]) -> str:
    """One message for a setting from pydantic's errors about it (the first that applies)."""
    names = _choices(hint)
    for err in errors:
        if err["type"] == "literal_error" and isinstance(err["input"], str):
            values = [value] if isinstance(value, str) else list(value)
            bad = [x for x in values if x not in names]
            near = difflib.get_close_matches(str(bad[0]), [str(n) for n in names], n=1)
            hint_ = f" (did you mean {near[0]!r}?)" if near else ""
            return f"unknown {', '.join(map(repr, bad))}{hint_}; choose from {', '.join(names)}"
    for err in errors:
        if err["type"] in _TYPE_ERRORS or err["type"] == "literal_error":
            return f"expected {expected(_bare(hint))}, got {describe(value)}"
    err = errors[0]
    if err["type"] == "too_short":
        return "must not be empty"
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = range_text(hint) if len(err["loc"]) <= 2 else ""
        if not bounds:  # an item of a list
            inner = typing.get_args(typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint)
            bounds = range_text(inner[0]) if inner else ""
            return f"must be {bounds or 'in range'} (each value), got {value!r}"
        return f"must be {bounds}, got {value!r}"
    return err["msg"]


_ADAPTER = TypeAdapter(RunSettings)


def check_settings(cfg: RunSettings) -> tuple[list[tuple[str, str]], set[str]]:
    """``(setting, problem)`` for every setting of ``cfg`` whose type or range is wrong, and for settings
    that contradict each other; and the names (``"rollouts.k"``, ``"seed"``) whose value is wrong.
    Checks nothing that needs the metric registry or the model files."""
    try:
        _ADAPTER.validate_python(cfg)
        errors: list[dict] = []
    except ValidationError as err:
        errors = err.errors()
    by_field: dict[tuple[str, str], list[dict]] = {}
    for e in errors:
        loc = [str(x) for x in e["loc"]]
        key = (loc[0], loc[1]) if loc[0] in SECTIONS and len(loc) > 1 else ("", loc[0])
        by_field.setdefault(key, []).append(e)
    problems, bad = [], set()
    for (section, name), errs in by_field.items():
        owner = getattr(cfg, section) if section else cfg
        hint = typing.get_type_hints(type(owner), include_extras=True)[name]
        problems.append((label(section, name), _field_problem(hint, getattr(owner, name), errs)))
        bad.add(f"{section}.{name}" if section else name)
    problems += cross_checks(cfg, bad)
    return problems, bad


def cross_checks(cfg: RunSettings, bad: set[str]) -> list[tuple[str, str]]:
    """Settings that are fine alone but contradict each other (``bad``: settings already found wrong,
    whose other checks are skipped)."""
    out = []
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


def value_problem(hint: Any, value: Any) -> str | None:
    """Whether ``value`` has the type ``hint`` (strictly: ``"8"`` is not an integer, ``true`` is not a
    number); None, or what was expected. For a metric's parameters, checked against its factory."""
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError:
        return f"expected {expected(hint)}, got {describe(value)}"
    except Exception:  # noqa: BLE001 - a hint pydantic cannot check: accept the value
        return None
    return None


# ------------------------------------------------------------------------------------------------
# Help text: declared once above, shown by `nice-kit config --help` and docs/settings.md


def setting_rows() -> list[dict[str, str]]:
    """One row per setting: ``setting`` (``rollouts.k``), ``type``, ``default``, ``range``, ``help``."""
    rows = []

    def add(cls: type, section: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        defaults = cls()
        for f in fields(cls):
            if section == "" and f.name in SECTIONS:
                continue
            hint = hints[f.name]
            names = _choices(hint)
            help_ = next((m.description for m in _metadata(hint) if getattr(m, "description", None)), "")
            rows.append({"setting": f"{section}.{f.name}" if section else f.name,
                         "type": expected(_bare(hint)),
                         "default": _toml(getattr(defaults, f.name)),
                         "range": ("one of " + ", ".join(map(str, names))) if names else range_text(hint),
                         "help": help_})

    add(RunSettings, "")
    for section, cls in SECTIONS.items():
        add(cls, section)
    return rows


def _metadata(hint: Any) -> list[Any]:
    out = []
    while typing.get_origin(hint) is Annotated:
        hint, *meta = typing.get_args(hint)
        out = list(meta) + out
    return out


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        key = lambda k: k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)  # noqa: E731
        return "{" + ", ".join(f"{key(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "(unset)"
    return repr(value)


def to_toml(cfg: RunSettings) -> str:
    """Every setting of ``cfg`` as a TOML config that reads back to the same settings (a metric given
    as a Python function is written by name, as a comment)."""
    top, tables = [], []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in SECTIONS:
            tables.append("")
            tables.append(f"[{f.name}]")
            for g in fields(value):
                v = getattr(value, g.name)
                if callable(v):
                    tables.append(f"# {g.name} = a Python function ({getattr(v, '__name__', v)!r})")
                else:
                    tables.append(f"{g.name} = {_toml(v)}")
        elif value is None:
            top.append(f"# {f.name} unset")
        else:
            top.append(f"{f.name} = {_toml(value)}")
    return "\n".join(top + tables) + "\n"


def _summary(cls: type) -> str:
    doc = " ".join((cls.__doc__ or "").split())
    return doc.split("``: ", 1)[1] if doc.startswith("``[") else doc


def settings_reference(markdown: bool = True) -> str:
    """Every setting with its type, default, range and help: ``docs/settings.md`` (``markdown``) or the
    plain text of ``nice-kit config --help``."""
    rows = setting_rows()
    docs = {"": "the model, the seed, the machine", **{s: _summary(c) for s, c in SECTIONS.items()}}
    out = []
    current = None
    for row in rows:
        section = row["setting"].split(".")[0] if "." in row["setting"] else ""
        if section != current:
            current = section
            title = f"[{section}]" if section else "(top level)"
            if markdown:
                out += ["", f"## {title}", "", docs[section], "", "| setting | default | allowed | what it does |",
                        "|---|---|---|---|"]
            else:
                out += ["", f"{title}  {docs[section]}"]
        allowed = row["range"] or row["type"]
        if row["range"] and not row["range"].startswith("one of"):
            allowed = f"{row['type']}, {row['range']}"
        name = row["setting"].split(".")[-1]
        if markdown:
            cells = [f"`{name}`", f"`{row['default']}`", allowed, row["help"]]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        else:
            out.append(f"  {name} = {row['default']}   ({allowed})")
            if row["help"]:
                out.append(f"      {row['help']}")
    head = ["# Settings", "", "Every setting of a run config (TOML), generated from `nice_kit/settings.py` by "
            "`python -m nice_kit.settings > docs/settings.md`; `nice-kit config --help` prints the same. A setting "
            "not given takes the default shown. On the command line, `--set section.setting=value` overrides one "
            "(`--set policy.baseline=none --set metric.params.max_words=3`)."] if markdown else []
    return "\n".join(head + out).strip() + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
