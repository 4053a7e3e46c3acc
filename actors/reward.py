"""Reward actors of the GRPO loop: a pool of workers that score batches in parallel.

    pool = RewardPool([RewardSpec("math_answer"), RewardSpec("format", 0.2)], num_actors=2)
    res = pool.score(prompts, completions, {"answer": answers})
    res.total            # [N] weighted sum, one per sample
    res.per_function     # {"math_answer": [N], "format": [N]}
    res.failures, res.timeouts, res.errors
    pool.shutdown()

Work is cut into tasks of (one reward term, up to `batch_size` samples). Each `RewardWorker`
runs one task at a time, so a task's clock starts when it is handed to an idle, started
worker. A term that raises, returns something other than one finite number per sample, or
runs past `timeout_s` gives `failure_reward` for that task's samples; the samples are
counted (failures / timeouts, per term), the message logged, and scoring goes on. A worker
that times out is killed (its Python code cannot be interrupted otherwise) and replaced in
the background. A term that fails on more than `max_failure_rate` of a call's samples raises
`RewardFailureError` with its first error and the call a reward function must take: a run
whose reward never works stops instead of training on `failure_reward`.

Reward functions are called with keywords only (rewards/registry.py): prompts=, completions=,
every column of `score`'s `columns` by name (the GRPO job adds completion_lengths), and the
spec's kwargs, so TRL-style `f(completions, **kwargs)` works. A function that cannot take that
call is refused with `RewardSignatureError` naming the term and the parameter: when the pool is
built (prompts, completions, kwargs, and `columns` if given), and in the driver at the start of
each `score` (the batch's columns), before any task runs. Registered names and paths are
resolved in the driver and the functions shipped to the workers, so a function registered by
the driver's own code works too.

A `reward_model` term is served by its own `RewardModelWorker` (a transformers
sequence-classification model loaded once from a local folder); its spec kwargs configure
the actor (`path`, `tokenizer_path`, `max_length`, `batch_size`, `template`,
`use_chat_template`, `label_index`, `timeout_s`).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import ray

from rewards.combine import call_reward, merge_kwargs
from rewards.registry import CALL_SIGNATURE, RewardSpec, check_signature, resolve

logger = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 5
EXPECTED_SIGNATURE = CALL_SIGNATURE  # rewards/registry.py


class RewardFailureError(RuntimeError):
    """A reward term failed on more than max_failure_rate of a scoring call's samples."""
_READY_TIMEOUT_S = 300.0  # starting an actor (and loading a reward model) on a busy CPU box


@dataclass
class RewardResult:
    """Scores of one batch. Lists have one entry per sample, in input order."""

    per_function: dict[str, list[float]]
    total: list[float]
    failures: dict[str, int]  # samples per term whose function raised or returned bad scores
    timeouts: dict[str, int]  # samples per term whose task ran past the timeout
    errors: list[str] = field(default_factory=list)  # the first few messages, "term: what happened"
    elapsed_s: float = 0.0


@ray.remote
class RewardWorker:
    """Runs reward functions (sync or async) on slices of a batch; one call at a time."""

    def __init__(self, specs: list[RewardSpec], fns: list | None = None):
        self.specs = specs
        # The driver's functions where it could ship them (a name registered by the driver's code
        # resolves only there), else resolved now, so a bad path fails at start-up, not in a task.
        fns = fns or [None] * len(specs)
        self.fns = [None if _needs_model_actor(s) else (f if f is not None else resolve(s.name_or_path))
                    for s, f in zip(specs, fns)]

    def ready(self) -> bool:
        return True

    def score(self, idx: int, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
        spec = self.specs[idx]
        return call_reward(self.fns[idx], prompts, completions, columns, spec.kwargs, spec.key)


@ray.remote
class RewardModelWorker:
    """A sequence-classification reward model from a local folder; `score` -> one float per pair.

    The text scored is `template.format(prompt=, completion=)` (default: the two joined), or,
    with `use_chat_template`, the tokenizer's chat template over a user and an assistant turn.
    The score is logit `label_index` (a reward model has one label).
    """

    def __init__(self, path: str, tokenizer_path: str | None = None, max_length: int = 1024,
                 batch_size: int = 16, template: str = "{prompt}{completion}", use_chat_template: bool = False,
                 label_index: int = 0, dtype: str = "float32", device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path or path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        if self.model.config.pad_token_id is None:
            # The classifier pools the last non-pad token; it must know which id is padding.
            self.model.config.pad_token_id = self.tok.pad_token_id
        self.model.to(self.device).eval()
        self.max_length, self.batch_size, self.label_index = max_length, batch_size, label_index
        self.template, self.use_chat_template = template, use_chat_template

    def ready(self) -> bool:
        return True

    def _text(self, prompt: str, completion: str) -> str:
        if self.use_chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self.tok.apply_chat_template(msgs, tokenize=False)
        return self.template.format(prompt=prompt, completion=completion)

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        with self.torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i : i + self.batch_size], return_tensors="pt", padding=True,
                               truncation=True, max_length=self.max_length).to(self.device)
                logits = self.model(**enc).logits  # [B, num_labels]
                out.extend(logits[:, self.label_index].float().cpu().tolist())
        return out


_RM_ACTOR_KWARGS = ("path", "tokenizer_path", "max_length", "batch_size", "template", "use_chat_template",
                    "label_index", "dtype", "device")


def _needs_model_actor(spec: RewardSpec) -> bool:
    return bool(getattr(resolve(spec.name_or_path), "needs_model_actor", False))


@dataclass
class _Slot:
    """One actor and what it is doing: starting (ready_ref), busy (task) or idle."""

    actor: Any
    spec_idx: int | None  # None: a RewardWorker for any function term; else the reward-model term it serves
    ready_ref: Any = None
    task: tuple[int, int, int] | None = None  # (spec index, start, end)
    ref: Any = None
    started: float = 0.0


class RewardPool:
    """Scores batches with several reward terms on `num_actors` Ray actors; see module doc."""

    def __init__(self, specs: Sequence[RewardSpec | str | Mapping[str, Any]], num_actors: int = 2,
                 timeout_s: float = 10.0, failure_reward: float = 0.0, batch_size: int = 64,
                 num_cpus_per_actor: float | None = None, max_failure_rate: float = 0.5,
                 columns: Sequence[str] | None = None):
        """columns: the names of the columns `score` will pass (dataset columns, completion_lengths),
        when known: every function's signature is then checked against them now."""
        self.specs = [RewardSpec.from_config(s) for s in specs]
        if not self.specs:
            raise ValueError("RewardPool.specs must name at least one reward")
        keys = [s.key for s in self.specs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"RewardPool.specs: terms {dup} appear twice; give each a distinct RewardSpec.label")
        if not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"RewardPool.num_actors must be an integer >= 1, got {num_actors!r}")
        if not timeout_s > 0:
            raise ValueError(f"RewardPool.timeout_s must be > 0, got {timeout_s!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardPool.batch_size must be an integer >= 1, got {batch_size!r}")
        if not math.isfinite(failure_reward):
            raise ValueError(f"RewardPool.failure_reward must be finite, got {failure_reward!r}")
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"RewardPool.max_failure_rate must be in [0, 1], got {max_failure_rate!r}")
        self.max_failure_rate = float(max_failure_rate)
        fns = [s.resolve() for s in self.specs]  # fail fast on unknown names, in the driver
        self.num_actors, self.timeout_s = num_actors, float(timeout_s)
        self.failure_reward, self.batch_size = float(failure_reward), batch_size
        self._options = {} if num_cpus_per_actor is None else {"num_cpus": num_cpus_per_actor}
        self._model_idx = [i for i, s in enumerate(self.specs) if _needs_model_actor(s)]
        self._fn_idx = [i for i in range(len(self.specs)) if i not in self._model_idx]
        for i in self._fn_idx:  # before any actor starts: can each function take the keyword call?
            check_signature(fns[i], self.specs[i].key, self.specs[i].kwargs, columns)
        self._fns = [fns[i] if i in self._fn_idx and _ships(fns[i]) else None for i in range(len(self.specs))]
        for i in self._model_idx:
            unknown = sorted(set(self.specs[i].kwargs) - set(_RM_ACTOR_KWARGS) - {"timeout_s"})
            if unknown:
                raise ValueError(f"reward term {self.specs[i].key!r}: unknown reward-model kwargs {unknown}; "
                                 f"accepted: {', '.join(_RM_ACTOR_KWARGS)}, timeout_s")
            if "path" not in self.specs[i].kwargs:
                raise ValueError(f"reward term {self.specs[i].key!r}: a reward model needs kwargs.path "
                                 "(a local model folder)")
        self._slots: list[_Slot] = []
        if self._fn_idx:
            self._slots += [self._start(None) for _ in range(num_actors)]
        self._slots += [self._start(i) for i in self._model_idx]
        self._wait_ready(self._slots)

    # -- actors -----------------------------------------------------------------------------

    def _start(self, spec_idx: int | None) -> _Slot:
        if spec_idx is None:
            actor = RewardWorker.options(**self._options).remote(self.specs, self._fns)
        else:
            kw = {k: v for k, v in self.specs[spec_idx].kwargs.items() if k in _RM_ACTOR_KWARGS}
            actor = RewardModelWorker.options(**self._options).remote(**kw)
        return _Slot(actor, spec_idx, ready_ref=actor.ready.remote())

    def _wait_ready(self, slots: list[_Slot]) -> None:
        refs = [s.ready_ref for s in slots if s.ready_ref is not None]
        try:
            ray.get(refs, timeout=_READY_TIMEOUT_S)
        except Exception:
            self.shutdown()
            raise
        for s in slots:
            s.ready_ref = None

    def _task_timeout(self, spec_idx: int) -> float:
        if spec_idx in self._model_idx:
            return float(self.specs[spec_idx].kwargs.get("timeout_s", self.timeout_s))
        return self.timeout_s

    def shutdown(self) -> None:
        """Kill every actor of the pool. The pool cannot score afterwards."""
        for s in self._slots:
            try:
                ray.kill(s.actor)
            except Exception:  # already dead
                pass
        self._slots = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- scoring ----------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              columns: Mapping[str, Sequence[Any]] | None = None) -> RewardResult:
        """Every term on every sample; failures and timeouts become `failure_reward`, counted."""
        t0 = time.monotonic()
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"RewardPool.score: {len(prompts)} prompts for {n} completions")
        columns = dict(columns or {})
        for k, v in columns.items():
            if not isinstance(v, Sequence) or isinstance(v, (str, bytes)) or len(v) != n:
                raise ValueError(f"RewardPool.score: column {k!r} must be a list with one entry per sample ({n})")
        if not self._slots:
            raise RuntimeError("RewardPool.score after shutdown()")
        prompts, completions = list(prompts), list(completions)
        columns = {k: list(v) for k, v in columns.items()}
        for i in self._fn_idx:  # a config error, not a sample failure: raise before any task runs
            merge_kwargs(self.specs[i].key, columns, self.specs[i].kwargs)
            fn = self._fns[i] if self._fns[i] is not None else self.specs[i].resolve()
            check_signature(fn, self.specs[i].key, self.specs[i].kwargs, columns)

        per = {s.key: [self.failure_reward] * n for s in self.specs}
        failures = {s.key: 0 for s in self.specs}
        timeouts = {s.key: 0 for s in self.specs}
        errors: list[str] = []
        first_error: dict[str, str] = {}  # per term, for RewardFailureError

        def record_error(spec_idx: int, start: int, end: int, msg: str, timed_out: bool) -> None:
            key = self.specs[spec_idx].key
            (timeouts if timed_out else failures)[key] += end - start
            text = f"{key} [samples {start}:{end}]: {msg}"
            first_error.setdefault(key, msg)
            logger.warning("reward failure: %s", text)
            if len(errors) < MAX_ERRORS_KEPT:
                errors.append(text)

        bs = self.batch_size
        queue = deque((i, s, min(s + bs, n)) for i in range(len(self.specs)) for s in range(0, n, bs))
        while queue or any(s.task is not None for s in self._slots):
            self._dispatch(queue, prompts, completions, columns)
            busy = [s for s in self._slots if s.task is not None]
            starting = [s for s in self._slots if s.ready_ref is not None]
            if not busy and not starting and queue:
                raise RuntimeError("RewardPool: tasks left but no actor can take them")  # pragma: no cover
            now = time.monotonic()
            wait_s = min((s.started + self._task_timeout(s.task[0]) - now for s in busy), default=_READY_TIMEOUT_S)
            refs = [s.ref for s in busy] + [s.ready_ref for s in starting]
            done, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, wait_s))
            done_set = set(done)
            if done:  # collect every finished ref, not just the first
                more, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                done_set.update(more)
            for slot in list(self._slots):
                if slot.ready_ref is not None and slot.ready_ref in done_set:
                    ray.get(slot.ready_ref)  # a replacement that cannot start is a real error: raise
                    slot.ready_ref = None
                elif slot.task is not None and slot.ref in done_set:
                    (idx, start, end), ref = slot.task, slot.ref
                    slot.task, slot.ref = None, None
                    try:
                        scores = ray.get(ref)
                    except ray.exceptions.RayActorError as e:  # the process died (os._exit, segfault, OOM)
                        record_error(idx, start, end, f"actor died ({type(e).__name__}); actor replaced", False)
                        self._replace(slot)
                        continue
                    except Exception as e:  # the function raised inside the actor
                        record_error(idx, start, end, _short(e), timed_out=False)
                        continue
                    bad = _check(scores, end - start)
                    if bad:
                        record_error(idx, start, end, bad, timed_out=False)
                    else:
                        per[self.specs[idx].key][start:end] = [float(x) for x in scores]
                elif slot.task is not None and time.monotonic() - slot.started >= self._task_timeout(slot.task[0]):
                    idx, start, end = slot.task
                    record_error(idx, start, end, f"timed out after {self._task_timeout(idx):g}s; actor replaced",
                                 timed_out=True)
                    self._replace(slot)

        for s in self.specs:  # a term that (nearly) never works: stop, naming its first error
            bad = failures[s.key] + timeouts[s.key]
            if n and bad > self.max_failure_rate * n:
                raise RewardFailureError(
                    f"reward term {s.key!r} failed on {bad} of {n} samples (more than reward.max_failure_rate="
                    f"{self.max_failure_rate:g}); first error: {first_error.get(s.key, '?')}; a reward function "
                    f"is called as {EXPECTED_SIGNATURE} (rewards/registry.py)")
        total = [sum(s.weight * per[s.key][i] for s in self.specs) for i in range(n)]
        return RewardResult(per, total, failures, timeouts, errors, time.monotonic() - t0)

    def _dispatch(self, queue: deque, prompts: list[str], completions: list[str], columns: dict[str, list]) -> None:
        """Hand queued tasks to idle, started actors that can run them."""
        for slot in self._slots:
            if slot.task is not None or slot.ready_ref is not None:
                continue
            task = next((t for t in queue if (t[0] in self._model_idx) == (slot.spec_idx is not None)
                         and (slot.spec_idx is None or t[0] == slot.spec_idx)), None)
            if task is None:
                continue
            queue.remove(task)
            idx, start, end = task
            if slot.spec_idx is None:
                cols = {k: v[start:end] for k, v in columns.items()}
                ref = slot.actor.score.remote(idx, prompts[start:end], completions[start:end], cols)
            else:
                ref = slot.actor.score.remote(prompts[start:end], completions[start:end])
            slot.task, slot.ref, slot.started = task, ref, time.monotonic()

    def _replace(self, slot: _Slot) -> None:
        """Kill a hung actor and start a fresh one in its place (ready in the background)."""
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        fresh = self._start(slot.spec_idx)
        slot.actor, slot.ready_ref, slot.task, slot.ref = fresh.actor, fresh.ready_ref, None, None


def _ships(fn: Any) -> bool:
    """Whether `fn` can travel to a worker (Ray pickles it with cloudpickle)."""
    try:
        ray.cloudpickle.dumps(fn)
        return True
    except Exception:  # noqa: BLE001 - a closure over a lock, a socket, ...: the worker resolves it
        return False


def _short(e: BaseException) -> str:
    """One line for the user's exception carried by a RayTaskError."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        lines = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {lines[0] if lines else ''}"[:300]
    lines = str(e).strip().splitlines()
    return (lines[-1] if lines else type(e).__name__)[:300]


def _check(scores: Any, n: int) -> str | None:
    """None if `scores` is n finite numbers, else what is wrong."""
    try:
        vals = [float(x) for x in scores]
    except (TypeError, ValueError):
        return f"returned {type(scores).__name__}, not a list of numbers"
    if len(vals) != n:
        return f"returned {len(vals)} scores for {n} samples"
    if not all(math.isfinite(v) for v in vals):
        return "returned non-finite scores"
    return None
