"""OUTPUT_DIR/run.json: what a finished run produced and how to rebuild its base model.

No Ray here. The training jobs write it after they save their result; export (and anything
else that opens a run folder) reads it instead of the job's YAML, whose keys belong to the
jobs layer and change with it. One flat JSON object, every field required:

  format_version  1
  task            sft | cpt | grpo
  finetune        lora | qlora | full
  preset, base_path   the base: a kernels.model preset (random weights) or a local model folder
  dtype, lora_r, lora_alpha, lora_targets, config_overrides, vocab_size
                  the kernels.model.ModelConfig fields that decide the base's weights and the
                  adapter's shape (vocab_size: the embedding rows training built, null = the
                  model folder's own)
  seed, train_device  a preset base is rebuilt with this seed on this device type (cpu | cuda:
                  their random streams differ)
  adapter_dir, merged_dir, tokenizer_dir
                  relative to the run folder (or absolute when outside it); "" = not produced
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

MANIFEST_FILE = "run.json"
FORMAT_VERSION = 1
TASKS = ("sft", "cpt", "grpo")
FINETUNES = ("lora", "qlora", "full")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class RunManifest:
    """The typed content of OUTPUT_DIR/run.json (see the module doc)."""

    task: str
    finetune: str
    preset: str = ""
    base_path: str = ""
    dtype: str = "auto"
    lora_r: int = 16
    lora_alpha: float = 32
    lora_targets: str | tuple[str, ...] = "all-linear"
    config_overrides: dict = field(default_factory=dict)
    vocab_size: int | None = None
    seed: int = 0
    train_device: str = "cpu"
    adapter_dir: str = "adapter"
    merged_dir: str = "merged"
    tokenizer_dir: str = "tokenizer"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        def bad(name: str, want: str):
            raise ValueError(f"field {name!r}: expected {want}, got {getattr(self, name)!r}")

        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            bad("format_version", f"{FORMAT_VERSION} (this version of the code reads format {FORMAT_VERSION})")
        for name, accepted in (("task", TASKS), ("finetune", FINETUNES), ("dtype", DTYPES),
                               ("train_device", DEVICES)):
            if getattr(self, name) not in accepted:
                bad(name, "one of " + ", ".join(accepted))
        for name in ("preset", "base_path", "adapter_dir", "merged_dir", "tokenizer_dir"):
            if not isinstance(getattr(self, name), str):
                bad(name, "a string")
        if not self.preset and not self.base_path:
            raise ValueError("field 'preset' / 'base_path': one of them must name the base model")
        if not _is_int(self.lora_r) or self.lora_r < 1:
            bad("lora_r", "an integer >= 1")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            bad("lora_alpha", "a number > 0")
        targets = self.lora_targets
        if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) and t for t in targets):
            object.__setattr__(self, "lora_targets", tuple(targets))
        elif targets != "all-linear":
            bad("lora_targets", "'all-linear' or a non-empty list of module names")
        if not isinstance(self.config_overrides, dict):
            bad("config_overrides", "an object (dict)")
        if self.vocab_size is not None and (not _is_int(self.vocab_size) or self.vocab_size < 1):
            bad("vocab_size", "null or an integer >= 1")
        if not _is_int(self.seed):
            bad("seed", "an integer")

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def for_run(cls, run_dir: str, task: str, model, *, seed: int, vocab_size: int | None,
                train_device: str, tokenizer_dir: str, adapter_dir: str | None = None,
                merged_dir: str | None = None) -> RunManifest:
        """The manifest of a run trained with `model` (a kernels.model.ModelConfig).

        Paths may be absolute or relative to the working directory (as the job config gives
        them); they are stored relative to `run_dir` when inside it. adapter_dir defaults to
        run_dir/adapter for lora/qlora and "" (none) for full fine-tuning, merged_dir to
        run_dir/merged. vocab_size None on a preset means
        the preset's own vocab size, which is then recorded."""
        from kernels.model import PRESETS

        if vocab_size is None and not model.path:
            vocab_size = int(model.config_overrides.get("vocab_size", PRESETS[model.preset]["vocab_size"]))
        if adapter_dir is None:
            adapter_dir = "" if model.finetune == "full" else os.path.join(run_dir, "adapter")
        if merged_dir is None:
            merged_dir = os.path.join(run_dir, "merged")
        targets = model.lora.target_modules
        return cls(
            task=task, finetune=model.finetune, preset=model.preset,
            base_path=os.path.abspath(model.path) if model.path else "", dtype=model.dtype,
            lora_r=model.lora.r, lora_alpha=model.lora.alpha,
            lora_targets=targets if isinstance(targets, str) else tuple(targets),
            config_overrides=dict(model.config_overrides), vocab_size=vocab_size, seed=int(seed),
            train_device="cuda" if str(train_device).startswith("cuda") else "cpu",
            adapter_dir=_relative(run_dir, adapter_dir),
            merged_dir=_relative(run_dir, merged_dir),
            tokenizer_dir=_relative(run_dir, tokenizer_dir))

    def model_config(self, **overrides):
        """The kernels.model.ModelConfig that builds this run's base (fields overridable)."""
        from kernels.model import LoraConfig, ModelConfig

        targets = self.lora_targets if isinstance(self.lora_targets, str) else list(self.lora_targets)
        args = dict(preset=self.preset or "tiny", path=self.base_path, finetune=self.finetune, dtype=self.dtype,
                    lora=LoraConfig(r=self.lora_r, alpha=self.lora_alpha, target_modules=targets),
                    config_overrides=dict(self.config_overrides))
        args.update(overrides)
        return ModelConfig(**args)

    def path_of(self, run_dir: str, rel: str) -> str:
        """A path field (adapter_dir, merged_dir, tokenizer_dir value) as an absolute path; "" stays ""."""
        return os.path.normpath(os.path.join(os.path.abspath(run_dir), rel)) if rel else ""

    # -- files ------------------------------------------------------------------------------

    def to_json(self) -> dict:
        d = asdict(self)
        if isinstance(d["lora_targets"], tuple):
            d["lora_targets"] = list(d["lora_targets"])
        return d

    def write(self, run_dir: str) -> str:
        """Write run_dir/run.json (atomically) and return its path."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, MANIFEST_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, run_dir: str) -> RunManifest:
        """run_dir/run.json -> RunManifest. Errors name the file and the field."""
        path = os.path.join(run_dir, MANIFEST_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no run manifest (written by the training jobs when a run saves)")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        return cls.from_json(data, where=path)

    @classmethod
    def from_json(cls, data, where: str = MANIFEST_FILE) -> RunManifest:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if _is_int(version) and version > FORMAT_VERSION:
            raise ValueError(f"{where}: field 'format_version' is {version}; this code reads format "
                             f"{FORMAT_VERSION} (written by a newer ray-posttrain)")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{where}: missing field {missing[0]!r}"
                             + (f" (and {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""))
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}; known fields: {', '.join(names)}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _relative(run_dir: str, p: str) -> str:
    """p relative to run_dir when inside it, else absolute; "" stays ""."""
    if not p:
        return ""
    root, full = os.path.abspath(run_dir), os.path.abspath(p)
    if full == root or full.startswith(root + os.sep):
        return os.path.relpath(full, root)
    return full
