"""What is measured on the target prompts: the one place where LESS and NICE differ.

Warmup, training gradients, projection, storage, influence and selection are shared. A
:class:`Measurement` turns the target records at a checkpoint into *weighted sequences*
(:class:`~nice_kit.gradients.WeightedSequence`: token ids with a weight on each predicted token,
grouped per target prompt); the pipeline takes the gradient of each group's weighted NLL, projects
it and compares it with the training gradients. Kronfluence calls this ``compute_measurement``.

Built in:

* :class:`ReferenceLoss` (``"less"``): the mean NLL of each prompt's reference answer (LESS);
* :class:`PolicyGradient` (``"nice"``): sum_k a_k NLL_sum(completion_k) over the model's own
  sampled completions, with weights a_k from the metric's rewards (:mod:`nice_kit.policy`).

Your own: subclass :class:`Measurement`, give it a ``name`` and a ``measure`` method, and pass an
instance wherever a method name goes (``run.validation_gradients(m)``, ``run.scores([m])``). Its
methods receive a :class:`MeasureContext` (``run`` below), not the pipeline: the settings, the
tokenizer, the checkpoint's rollouts and rewards, and a log::

    class SecondAnswer(Measurement):
        name = "second_answer"

        def measure(self, run, ckpt, records):
            seqs = [mean_nll_sequence(tokenize_pair(run.tokenizer, r.messages, r.columns["answer2"],
                                                    run.cfg.data.max_length), group=i)
                    for i, r in enumerate(records)]
            return Measured(seqs)
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .data import Record, prompt_ids, tokenize_pair
from .gradients import WeightedSequence, mean_nll_sequence
from .policy import PromptWeights, applicable_settings, policy_weights, reference_weights

if TYPE_CHECKING:  # pragma: no cover
    from .settings import RunSettings
    from .warmup import Checkpoint


class MeasureContext:
    """What a :class:`Measurement` sees of a run: a small, documented surface over the pipeline that
    made it (the pipeline itself stays out of reach).

    * ``cfg``: the run's settings (:class:`nice_kit.settings.RunSettings`);
    * ``tokenizer``: the run's tokenizer (loaded on first use);
    * ``rollouts(ckpt)``: the checkpoint's sampled completions with their ``reward`` (a DataFrame);
    * ``rollout_inputs(ckpt)``, ``reward_inputs()``: what those depend on (for a measurement's key);
    * ``reference_rewards()``: the metric's reward of each target prompt's reference answer;
    * ``log(message)``: a progress line (shown when the run is verbose)."""

    __slots__ = ("_run",)

    def __init__(self, run: Any):
        self._run = run

    @property
    def cfg(self) -> "RunSettings":
        return self._run.cfg

    @property
    def tokenizer(self) -> Any:
        return self._run.tokenizer

    def rollouts(self, ckpt: "Checkpoint") -> pd.DataFrame:
        return self._run.rollouts(ckpt)

    def rollout_inputs(self, ckpt: "Checkpoint") -> dict[str, Any]:
        return self._run.rollout_inputs(ckpt)

    def reward_inputs(self) -> dict[str, Any]:
        return self._run.reward_inputs()

    def reference_rewards(self) -> dict[str, float]:
        return self._run.reference_rewards()

    def log(self, message: str) -> None:
        self._run.log(message)

    def __repr__(self) -> str:
        return f"MeasureContext(model={self.cfg.model!r})"


@dataclass
class Measured:
    """What a measurement produced for a list of target records.

    ``sequences[i].group`` is the index of the record (within the list) whose gradient the sequence
    adds to. ``valid[i]`` says whether record i carries a signal (False: left out of the influence
    aggregate); None means every record does."""

    sequences: list[WeightedSequence]
    valid: list[bool] | None = None


class Measurement:
    """Base class: what to measure on the target prompts. Subclass and implement :meth:`measure`."""

    name: str = "measurement"
    needs_reference: bool = True  # reads reference answers (not allowed in a label-free run)

    def key(self, run: MeasureContext, ckpt: "Checkpoint") -> dict[str, Any]:
        """Everything the result depends on besides the checkpoint, the target prompts and the projection.

        The default names the class and hashes its source and attributes; override it when the
        measurement depends on something else (a file, a model)."""
        cls = type(self)
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = cls.__qualname__
        attrs = {k: repr(v) for k, v in sorted(vars(self).items()) if not k.startswith("_")}
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "source": hashlib.sha256(source.encode()).hexdigest()[:16],
                "attributes": attrs, "max_length": run.cfg.data.max_length}

    def prepare(self, run: MeasureContext, ckpt: "Checkpoint") -> dict[str, Any] | None:
        """Work done once per checkpoint before any chunk is measured (e.g. rollouts). Returns
        optional JSON notes per target prompt id, saved beside the vectors as ``notes.json``."""
        return None

    def measure(self, run: MeasureContext, ckpt: "Checkpoint", records: list[Record]) -> Measured:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ReferenceLoss(Measurement):
    """LESS: the gradient of each target prompt's reference answer's mean NLL."""

    name = "less"
    needs_reference = True

    def key(self, run, ckpt):
        return {"measurement": "reference_loss", "max_length": run.cfg.data.max_length}

    def measure(self, run, ckpt, records):
        max_len = run.cfg.data.max_length
        seqs = [mean_nll_sequence(tokenize_pair(run.tokenizer, r.messages, r.response, max_len), i)
                for i, r in enumerate(records)]
        return Measured(seqs)


@dataclass
class PolicyGradient(Measurement):
    """NICE: sum_k a_k grad NLL_sum(y_k | x) over K sampled completions y_k of each target prompt.

    The rollouts, the metric and the policy settings come from the run's config
    (``[rollouts]``, ``[metric]``, ``[policy]``)."""

    name: str = "nice"
    _prepared: dict[int, tuple[pd.DataFrame, dict[str, PromptWeights]]] = field(default_factory=dict, repr=False)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return False  # the rejection variant reads references; the config check refuses it when label-free

    def key(self, run, ckpt):
        return {"measurement": "policy_gradient", "rollouts": run.rollout_inputs(ckpt), "rewards": run.reward_inputs(),
                "policy": applicable_settings(run.cfg.policy, run.cfg.data.label_free),
                "max_length": run.cfg.data.max_length}

    def weights(self, run: MeasureContext, ckpt: "Checkpoint") -> tuple[pd.DataFrame, dict[str, PromptWeights]]:
        """The checkpoint's rollouts with a ``weight`` column, and the weights of each prompt."""
        p = run.cfg.policy
        return weigh_rollouts(run.rollouts(ckpt), p, run.reference_rewards() if uses_reference_reward(p) else {})

    def prepare(self, run, ckpt):
        df, per_prompt = self.weights(run, ckpt)
        self._prepared[ckpt.epoch] = (df, per_prompt)
        silent = [pid for pid, pw in per_prompt.items() if not pw.signal]
        if silent:
            fate = ("count as 0 in their subtask's mean (the reference's arithmetic)"
                    if run.cfg.policy.estimator == "reference" else "left out of the aggregate")
            run.log(f"epoch {ckpt.epoch}: {len(silent)} of {len(per_prompt)} target prompts carry no signal "
                    f"(every policy weight is zero); {fate}")
        return {pid: {"signal": pw.signal, "note": pw.note, "reference_weight": pw.reference}
                for pid, pw in per_prompt.items()}

    def measure(self, run, ckpt, records):
        if ckpt.epoch not in self._prepared:
            self.prepare(run, ckpt)
        df, per_prompt = self._prepared[ckpt.epoch]
        by_prompt = {pid: rows for pid, rows in df.groupby("prompt_id", sort=False)}
        reference = run.cfg.policy.estimator == "reference"
        seqs: list[WeightedSequence] = []
        valid = []
        for j, rec in enumerate(records):
            pw = per_prompt[rec.id]
            valid.append(True if reference else bool(pw.signal))  # the reference counts a zero gradient as 0
            rows = by_prompt.get(rec.id)
            p_ids = prompt_ids(run.tokenizer, rec.messages)
            if rows is not None:
                for row in rows.itertuples():
                    seq = estimator_sequence(run, p_ids, token_ids=row.token_ids, text=row.completion,
                                             ended_with_eos=row.ended_with_eos, weight=float(row.weight), group=j,
                                             eos_id=getattr(row, "eos_token_id", None)) if row.weight != 0 else None
                    if seq is not None:
                        seqs.append(seq)
            if pw.reference:
                seqs.append(reference_fallback_sequence(run, rec, pw.reference, j))
        return Measured(seqs, valid)


def weigh_rollouts(df: pd.DataFrame, policy, reference_rewards: dict[str, float]
                   ) -> tuple[pd.DataFrame, dict[str, PromptWeights]]:
    """``df`` (rollouts with a ``reward`` column) with each completion's policy weight in ``weight``,
    and each prompt's :class:`~nice_kit.policy.PromptWeights`, under ``policy`` (``[policy]``)."""
    p, ref = policy, reference_rewards
    df = df.copy()
    weights, per_prompt = np.zeros(len(df)), {}
    for pid, idx in df.groupby("prompt_id", sort=False).indices.items():
        rewards = df["reward"].iloc[idx].tolist()
        if p.estimator == "reference":
            pw = reference_weights(rewards, variant=p.variant, reference_reward=ref.get(pid),
                                   worst_case_protect=p.worst_case_protect)
        else:
            pw = policy_weights(rewards, variant=p.variant, baseline=p.baseline,
                                topk=p.topk, reference_reward=ref.get(pid),
                                fallback_to_reference=p.fallback_to_reference and pid in ref,
                                divide_by_kept=p.divide_by_kept)
        weights[idx] = pw.completion
        per_prompt[pid] = pw
    df["weight"] = weights
    return df, per_prompt


def uses_reference_reward(policy) -> bool:
    """Whether the configured estimator reads the metric's reward of the reference answers."""
    if policy.estimator == "reference":
        return policy.variant in ("hard_rejection", "topk_hard") or (policy.variant != "vanilla"
                                                                    and policy.worst_case_protect)
    return policy.variant == "rejection"


def reference_fallback_sequence(run: MeasureContext, rec: Record, weight: float, group: int) -> WeightedSequence:
    """The reference answer's NLL times ``weight``, summed over its tokens (a rejection variant's
    fallback; the mean instead under the reference estimator's ``do_normalize``)."""
    ref = tokenize_pair(run.tokenizer, rec.messages, rec.response, run.cfg.data.max_length)
    seq = mean_nll_sequence(ref, group)
    p = run.cfg.policy
    n = 1 if (p.estimator == "reference" and p.do_normalize) else max(ref.n_response_tokens, 1)
    seq.weights = [x * n * weight for x in seq.weights]
    return seq


def estimator_sequence(run: MeasureContext, p_ids: list[int], *, token_ids: list[int], text: str, ended_with_eos: bool,
                       weight: float, group: int, eos_id: Any = None) -> WeightedSequence | None:
    """A sampled completion as the configured estimator takes its gradient:
    :func:`completion_sequence` (nice_kit: the sampled ids) or :func:`reference_completion_sequence`
    (the reference: the text the metric scored, encoded again)."""
    if run.cfg.policy.estimator == "reference":
        return reference_completion_sequence(run, p_ids, text, weight, group)
    return completion_sequence(run, p_ids, list(token_ids), bool(ended_with_eos), weight, group,
                               eos_id=None if eos_id is None or pd.isna(eos_id) else int(eos_id))


def reference_completion_sequence(run: MeasureContext, p_ids: list[int], text: str, weight: float,
                                  group: int) -> WeightedSequence | None:
    """A completion as the reference takes its gradient: its text (the sampled ids decoded with
    special tokens skipped, so never an end-of-sequence token) encoded again without special tokens
    after the prompt, the NLL summed over those tokens (``do_normalize``: their mean) times ``weight``.

    An empty text has no token: the reference's loss over no token is 0/0, whose gradient PyTorch
    gives as exactly zero, so the completion adds nothing (but still counts among the kept for the
    division): None here. nice_kit cuts the re-encoded tokens at ``data.max_length``; the reference
    does not cut."""
    comp = list(run.tokenizer.encode(text, add_special_tokens=False)) if text else []
    comp = comp[: max(1, run.cfg.data.max_length - len(p_ids))]
    if not comp:
        return None
    per_token = weight / len(comp) if run.cfg.policy.do_normalize else weight
    return WeightedSequence(p_ids + comp, [0.0] * len(p_ids) + [per_token] * len(comp), group)


def completion_sequence(run: MeasureContext, p_ids: list[int], toks: list[int], ended_with_eos: bool, weight: float,
                        group: int, eos_id: int | None = None) -> WeightedSequence | None:
    """A sampled completion as a weighted sequence: prompt (weight 0) + the sampled tokens, with the
    end-of-sequence token only where the model sampled it (``policy.include_eos``; ``eos_id`` is the
    one it sampled, when a model has several). None when the completion has no token to take a
    gradient over."""
    eos = eos_id if eos_id is not None else run.tokenizer.eos_token_id
    comp = list(toks)
    if ended_with_eos and eos is not None and run.cfg.policy.include_eos:
        comp.append(eos)
    comp = comp[: max(1, run.cfg.data.max_length - len(p_ids))]
    if not comp:
        return None
    per_token = weight / len(comp) if run.cfg.policy.token_normalize else weight
    return WeightedSequence(p_ids + comp, [0.0] * len(p_ids) + [per_token] * len(comp), group)


BUILTIN = {"less": ReferenceLoss, "nice": PolicyGradient}


class Measurements:
    """The measurements a run knows: the built-in ones by name, and every instance it was given."""

    def __init__(self) -> None:
        self._given: dict[str, Measurement] = {}

    def get(self, method: "str | Measurement") -> Measurement:
        """The measurement ``method`` stands for; an instance is remembered under its name."""
        if isinstance(method, Measurement):
            self._given[method.name] = method
            return method
        return self._given.get(method) or as_measurement(method)

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a built-in measurement or one given to this run."""
        return name in self._given or name in BUILTIN


def as_measurement(method: "str | Measurement") -> Measurement:
    """``"less"`` / ``"nice"`` or a :class:`Measurement` instance."""
    if isinstance(method, Measurement):
        return method
    if isinstance(method, str) and method in BUILTIN:
        return BUILTIN[method]()
    raise ValueError(f"method must be one of {sorted(BUILTIN)} or a nice_kit.measurements.Measurement, not {method!r}")
