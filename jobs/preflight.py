"""Preflight: what can be known before Ray starts or weights load, checked in seconds.

Every job's main runs it right after the config is loaded (`if preflight_sft(cfg): return 2`).
It checks, cheapest first:
  - output_dir (and trainer.storage_path, eval's --out): a writable folder, or one that can be created;
  - data paths (files, globs, comma lists, folders, URIs, dataset names; cluster.readers.resolve_sources):
    exist, readable; a dataset name loads (datasets.load_dataset; offline: from the Hugging Face cache)
    with its split and subset;
  - reward functions: each name or module:function resolves (rewards.registry.resolve, not called)
    and takes `fn(prompts, completions, **columns)`;
  - the model: a hub id resolves to its snapshot folder in the Hugging Face cache (kernels.hub; fetched
    unless HF_HUB_OFFLINE=1), a folder's config.json loads with a model_type (transformers AutoConfig), a
    .gguf file exists and is a GGUF file; the model builds on the meta device (no memory, no weights);
  - the tokenizer (folder or hub id) loads (AutoTokenizer on a local folder);
  - every LoRA target module (model.lora.target_modules; "all-linear" = kernels.model.LORA_ALL_LINEAR)
    names a Linear/Embedding/Conv layer of that model.
  - report_to: every tracker name is known and its package installed (cluster.tracking).
Numeric ranges (sizes, timeouts) are checked earlier, when the config loads (kernels.config_fields).
A failure is one line on stderr, `preflight: <field>: <value>: <what was expected>`, and exit code 2.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings


class PreflightError(Exception):
    """One failed check; str() is the line after "preflight: "."""


def _fail(field: str, value, expected: str):
    raise PreflightError(f"{field}: {value!r}: {expected}")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _quiet():
    """No warnings or transformers log lines while checking: the failure is the only output."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hf_logging:
            hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            if hf_logging:
                hf_logging.set_verbosity(level)


@contextlib.contextmanager
def _datasets_quiet():
    """No progress bars or log lines of `datasets` while a dataset loads for a check."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars, level = datasets.is_progress_bar_enabled(), ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------------------------------- paths

def check_writable_dir(field: str, path: str) -> None:
    """`path` is a writable folder, or can be created (its nearest existing parent is writable)."""
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(full):
        if not os.path.isdir(full):
            _fail(field, path, "expected a folder to write into; a file is there")
        if not os.access(full, os.W_OK | os.X_OK):
            _fail(field, path, "expected a writable folder; this one is not writable")
        return
    parent = os.path.dirname(full)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail(field, path, f"expected a folder that can be created; {parent!r} on its way is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(field, path, f"expected a folder that can be created; {parent!r} is not writable")


def _check_readable_file(field: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        _fail(field, path, f"expected a readable file ({e.strerror or _first_line(e)})")


def check_data(field: str, path: str, subset: str = "", split: str = "", part: int = 0) -> None:
    """Data files, globs, comma lists, folders and URIs exist and can be read; datasets (names, dataset
    folders, saved datasets) load with their split and subset (`part` 1: an eval path, its eval split;
    the readers' own checks, and a dataset name loaded here is not loaded again)."""
    from cluster.readers import is_uri, open_dataset, read_uri, resolve_sources

    try:
        sources = resolve_sources(path, field, subset=subset, split=split)
    except (OSError, ValueError) as e:  # their messages start with the field
        raise PreflightError(_first_line(e, 400)) from None
    for s in sources:
        if s.kind == "file" and is_uri(s.path):
            try:
                read_uri(s.path, 1)
            except (OSError, ValueError) as e:
                _fail(field, s.path, f"expected a readable file ({_first_line(e)})")
        elif s.kind == "file":
            _check_readable_file(field, s.path)
        else:  # a dataset
            if os.path.isdir(s.path) and not os.access(s.path, os.R_OK | os.X_OK):
                _fail(field, s.path, "expected a readable folder")
            try:
                with _quiet(), _datasets_quiet():
                    open_dataset(s, part)
            except (OSError, ValueError) as e:  # the readers' messages start with the setting
                line = _first_line(e, 400)
                raise PreflightError(line if line.startswith(field.split(".")[0] + ".")
                                     else f"{field}: {s.path!r}: {line}") from None


def check_eval_data(field: str, data: str, subset: str = "", split: str = "") -> None:
    """An evaluation's data as cluster.evaluate.load_rows reads it: check_data with a dataset's eval
    split (split ""), and a subset only where a dataset name or repo folder takes it."""
    from cluster.evaluate import check_subset

    check_data(field, data, subset, split, part=1)
    try:
        check_subset(data, subset, split, field)
    except (OSError, ValueError) as e:  # the message starts with the setting
        raise PreflightError(_first_line(e, 400)) from None


# ---------------------------------------------------------------------------------------- rewards

def check_rewards(functions, field: str = "reward.functions") -> None:
    """Each reward term resolves (registered name or module:function, imported, not called) and
    can be called with keywords: fn(prompts=, completions=, **columns, **kwargs)
    (rewards.registry.check_signature)."""
    from rewards.registry import (RewardSignatureError, RewardSpec, UnknownRewardError, check_signature,
                                  registered_names, resolve)

    for i, item in enumerate(functions):
        key = f"{field}[{i}]"
        try:
            spec = RewardSpec.from_config(item)
        except (TypeError, ValueError) as e:
            _fail(key, item, _first_line(e))
        name = spec.name_or_path
        try:
            fn = resolve(name)
        except UnknownRewardError as e:
            if ":" in name:
                _fail(key, name, _first_line(e).replace(f"reward path {name!r}: ", "", 1))
            _fail(key, name, f"expected a registered reward ({', '.join(registered_names())}) "
                             f"or a 'module:function' path")
        except Exception as e:  # noqa: BLE001 - the module's own import failed
            _fail(key, name, f"importing it failed: {type(e).__name__}: {_first_line(e)}")
        try:  # the pool's own check: called with keywords (prompts=, completions=, columns, kwargs);
            # the GRPO job passes completion_lengths= on every call, whatever the dataset
            check_signature(fn, name, spec.kwargs)
            check_signature(fn, name, columns=["completion_lengths"], kwargs=spec.kwargs, required_ok=True)
        except RewardSignatureError as e:
            _fail(key, name, _first_line(e))


# ---------------------------------------------------------------------------------------- model

def _hub(resolve, field: str, path: str) -> str:
    """A hub id as its snapshot folder (kernels.hub); a local path as it is."""
    try:
        return resolve(path, field)
    except ValueError as e:  # the message starts with the field and names the id
        raise PreflightError(_first_line(e, 400)) from None


def model_config(field: str, path: str):
    """The transformers config of a model folder (or hub id); None for a .gguf file (checked: a GGUF file)."""
    from kernels.hub import resolve_model
    from kernels.model import is_gguf

    path = _hub(resolve_model, field, path)
    if is_gguf(path):
        _check_readable_file(field, path)
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                _fail(field, path, "expected a GGUF file (it does not start with the GGUF magic bytes)")
        return None
    if not os.path.isdir(path):
        _fail(field, path, "expected a Hugging Face model folder (config.json + weights), a .gguf file or a hub id "
                           "(org/name)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        _fail(field, path, "expected a Hugging Face model folder; it holds no config.json")
    from transformers import AutoConfig

    try:
        with _quiet():
            config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        _fail(field, path, f"expected a config.json transformers can load ({_first_line(e)})")
    if not getattr(config, "model_type", ""):
        _fail(field, path, "expected a config.json with a model_type")
    return config


def meta_model(field: str, value, config):
    """The causal LM of `config` on the meta device: its modules, no memory and no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with _quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001
        _fail(field, value, f"expected a causal LM transformers can build ({_first_line(e)})")


def check_tokenizer(field: str, path: str) -> None:
    """A tokenizer folder (or hub id) loads (a .gguf file: readable; its tokenizer loads with the weights)."""
    from kernels.hub import resolve_tokenizer
    from kernels.model import is_gguf

    path = _hub(resolve_tokenizer, field, path)
    if is_gguf(path):
        _check_readable_file(field, path)
        return
    if not os.path.isdir(path):
        _fail(field, path, "expected a tokenizer folder (tokenizer.json / tokenizer_config.json), a .gguf file "
                           "or a hub id (org/name)")
    from kernels.tokenizer import load_tokenizer

    try:
        with _quiet():
            load_tokenizer(path)
    except Exception as e:  # noqa: BLE001
        _fail(field, path, f"expected a tokenizer folder that loads ({_first_line(e)})")


_LAYER_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def check_lora_targets(lora, model, field: str = "model.lora.target_modules") -> None:
    """Every target name matches a module PEFT can adapt (by PEFT's rule: the module's full name,
    or its name after a dot)."""
    modules = list(model.named_modules())
    linear = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in modules if type(m).__name__ == "Linear"))
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    for target in lora.modules():
        hits = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not hits:
            also = (f" ('all-linear' stands for {', '.join(lora.modules())}; list the ones this model has)"
                    if lora.target_modules == "all-linear" else "")
            _fail(field, target, f"expected a module name of this {model_type} model; its linear layers are "
                                 f"{', '.join(linear)}{also}")
        bad = sorted({type(m).__name__ for m in hits if type(m).__name__ not in _LAYER_TYPES})
        if bad:
            _fail(field, target, f"expected a Linear, Embedding or Conv layer; it names a {', '.join(bad)} "
                                 f"(its linear layers: {', '.join(linear)})")


def check_model(model_cfg, tokenizer: str | None, *, lora: bool):
    """model.path (or the preset), the tokenizer folder if any, the LoRA targets if `lora`; returns
    the meta-device model (None for a .gguf file)."""
    from kernels.model import hf_config

    if model_cfg.path:
        config, field, value = model_config("model.path", model_cfg.path), "model.path", model_cfg.path
    else:
        field, value = "model.config_overrides", dict(model_cfg.config_overrides)
        try:
            with _quiet():
                config = hf_config(model_cfg.preset, **model_cfg.config_overrides)
        except Exception as e:  # noqa: BLE001
            _fail(field, value, f"expected keys of the {model_cfg.preset} config ({_first_line(e)})")
    if tokenizer:
        check_tokenizer("model.tokenizer" if model_cfg.tokenizer else "model.path", tokenizer)
    if config is None:
        return None
    model = meta_model(field, value, config)
    if lora:
        check_lora_targets(model_cfg.lora, model)
    return model


# ---------------------------------------------------------------------------------------- jobs

def check_sft(cfg):
    """The SFT/CPT job (jobs.sft.SFTJobConfig); returns the meta-device model (None for .gguf)."""
    check_writable_dir("output_dir", cfg.output_dir)
    tc = cfg.trainer
    if tc.storage_path and "://" not in tc.storage_path:
        check_writable_dir("trainer.storage_path", tc.storage_path)
    if cfg.data.path != "builtin":
        check_data("data.path", cfg.data.path, cfg.data.subset, cfg.data.split)
    if cfg.data.eval_path:
        check_data("data.eval_path", cfg.data.eval_path, cfg.data.subset, part=1)
    m = cfg.model
    # the tokenizer jobs.sft.prepare_tokenizer takes; without one it trains its own
    tok = m.tokenizer or (m.path if m.path and os.path.isfile(os.path.join(m.path, "tokenizer_config.json")) else "")
    return check_model(m, tok, lora=m.finetune != "full")


def check_grpo(cfg) -> None:
    """The GRPO job (jobs.grpo.GRPOJobConfig), and the SFT warm-up it runs first, if any."""
    check_writable_dir("output_dir", cfg.output_dir)
    if cfg.data.path != "builtin":
        check_data("data.path", cfg.data.path, cfg.data.subset, cfg.data.split)
    if cfg.eval.enabled and cfg.eval.data != "builtin":
        check_eval_data("eval.data", cfg.eval.data, cfg.eval.subset, cfg.eval.split)
    if cfg.env.enabled:  # the reward is the environment's; reward.functions are not called
        check_env(cfg.env)
    else:
        check_rewards(cfg.reward.functions)
    m, lora = cfg.model, cfg.model.finetune != "full"
    if m.path:  # jobs.grpo.tokenizer_dir: model.tokenizer, else the model folder's
        tok = m.tokenizer or m.path
        if not os.path.isfile(os.path.join(tok, "tokenizer_config.json")):
            _fail("model.tokenizer" if m.tokenizer else "model.path", tok,
                  "expected a folder holding a tokenizer (tokenizer_config.json); set model.tokenizer")
        check_model(m, tok, lora=lora)
    elif cfg.init.sft_config:
        _check_grpo_init(cfg, lora)
    else:
        if not m.tokenizer:
            _fail("model.path", "", "expected a model folder with a tokenizer (or model.tokenizer, or "
                                    "init.sft_config to train the starting model first)")
        if cfg.eval.enabled:
            _fail("model.path", "", "expected a model folder: the held-out evaluation (eval.enabled) needs one "
                                    "(or set init.sft_config)")
        check_model(m, m.tokenizer, lora=lora)


def check_env(env) -> None:
    """One instance of the environment is made (its constructor checks e.g. the tool sandbox), so
    a missing sandbox or a bad argument stops the job here, not in a rollout actor."""
    from actors.environments import make_env

    try:
        make_env(env.spec())
    except Exception as e:  # noqa: BLE001 - the environment's own message, with the key
        _fail("env.name", env.name, f"the environment cannot be made: {_first_line(e)}")


def _check_grpo_init(cfg, lora: bool) -> None:
    """The SFT warm-up (init.sft_config) with the overrides jobs.grpo.prepare_start_model gives it,
    unless OUTPUT_DIR/sft/merged already exists; the LoRA targets against the model it trains."""
    from dataclasses import replace

    from jobs.config import ConfigError, load
    from jobs.sft import SFTJobConfig

    sft_dir = os.path.join(cfg.output_dir, "sft")
    merged = os.path.join(sft_dir, "merged")
    if os.path.isfile(os.path.join(merged, "config.json")):
        check_model(replace(cfg.model, path=merged, tokenizer=""), None, lora=lora)
        return
    path = cfg.init.sft_config_path()
    overrides = [f"output_dir={sft_dir}", f"seed={cfg.seed}"] + list(cfg.init.sft_overrides)
    if cfg.init.sft_steps:
        overrides.append(f"max_steps={cfg.init.sft_steps}")
    try:
        sft = load(SFTJobConfig, path, overrides)
    except ConfigError as e:
        _fail("init.sft_config", cfg.init.sft_config, f"expected a valid SFT config ({_first_line(e)})")
    try:
        model = check_sft(sft)
    except PreflightError as e:
        raise PreflightError(f"{cfg.init.sft_config}: {e}") from None
    if lora and model is not None:  # GRPO adapts the model the warm-up trains: same modules
        check_lora_targets(cfg.model.lora, model)


def check_eval(cfg, target: str, out: str = "", base: str | None = None) -> None:
    """`posttrain eval TARGET`: the target folder, --base, the data, where eval.json goes."""
    if not os.path.isdir(target):
        _fail("TARGET", target, "expected a run output_dir, an adapter folder or a model folder; "
                                "this is not a folder")
    if base:
        model_config("--base", base)
    if cfg.data != "builtin":
        check_eval_data("data", cfg.data, cfg.subset, cfg.split)
    out = out or target
    if out.endswith(".json"):
        if os.path.isdir(out):
            _fail("--out", out, "expected a .json file path or a folder; a folder has that name")
        check_writable_dir("--out", os.path.dirname(os.path.abspath(out)))
    else:
        check_writable_dir("--out", out)
    if cfg.backend == "hf":
        from kernels.export_source import resolve_source

        try:
            resolve_source(target, base)
        except (OSError, ValueError) as e:
            msg = _first_line(e, 400).removeprefix("export: ")
            for shown in (repr(target), repr(os.path.abspath(target))):  # said once, before the colon
                msg = msg.removeprefix(shown + " ")
            _fail("TARGET", target, msg)


def check_serve(cfg) -> None:
    """`posttrain serve` (cluster.serve.ServeConfig): `engine: vllm` builds Ray's ray.serve.llm app
    where the command runs (cluster/serve_vllm.py), so that module must import here, with the
    installed vLLM. Imported only for engine == "vllm" (vLLM takes seconds to import); hf and
    vllm-async import nothing here (vllm-async imports vLLM on its replicas)."""
    if cfg.engine != "vllm":
        return
    try:
        with _quiet():  # ray.serve.llm, its ingress and its request models, as build_app imports them
            importlib.import_module("cluster.serve_vllm")
    except Exception as e:  # noqa: BLE001 - ImportError, or whatever vLLM raises while importing
        why = _first_line(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {_first_line(e)}"
        ray_version = _dist_version("ray") or "?"
        try:  # imported already, or failing fast, after the attempt above
            import vllm

            version = str(getattr(vllm, "__version__", "") or "")
        except Exception:  # noqa: BLE001
            version = ""
        version = version or _dist_version("vllm")
        if not version:
            _fail("engine", cfg.engine, f"Ray {ray_version}'s ray.serve.llm needs vLLM, which is not installed "
                                        f"here ({why}); on a GPU machine install the gpu extra "
                                        f"(pip install 'ray-posttrain[gpu]') and use engine=vllm-async, "
                                        f"on CPU engine=hf")
        _fail("engine", cfg.engine, f"Ray {ray_version}'s ray.serve.llm does not import with the installed "
                                    f"vLLM {version} ({why}); use engine=vllm-async (this project's app over "
                                    f"vLLM's AsyncLLMEngine), or a Ray whose ray.serve.llm matches this vLLM")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return ""


# ---------------------------------------------------------------------------------------- tracking

def check_tracking(report_to, field: str = "report_to") -> None:
    """Each tracker of `report_to` is known and its package importable (not imported: cheap)."""
    from cluster.tracking import check_report_to

    try:
        check_report_to(report_to, field)
    except ValueError as e:  # the message starts with the field and names the package
        raise PreflightError(str(e)) from None


def run(check, *args, **kwargs) -> int:
    """0 when `check` passes; else print its one line on stderr and return 2 (the exit code)."""
    try:
        check(*args, **kwargs)
    except PreflightError as e:
        print(f"preflight: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def preflight_sft(cfg) -> int:
    return run(check_sft, cfg) or run(check_tracking, cfg.report_to)


def preflight_grpo(cfg) -> int:
    return run(check_grpo, cfg) or run(check_tracking, cfg.report_to)


def preflight_eval(cfg, target: str, out: str = "", base: str | None = None) -> int:
    return run(check_eval, cfg, target, out, base)


def preflight_serve(cfg) -> int:
    return run(check_serve, cfg)
