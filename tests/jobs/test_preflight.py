"""The preflight (jobs/preflight.py): each problem it can know before Ray starts or weights load
ends the job in one line `preflight: <field>: <value>: <expected>`, exit code 2, no traceback.
The jobs' mains run in-process (their run_* functions replaced: reaching them is a failure here)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import jobs.grpo
import jobs.sft
from jobs import preflight
from jobs.config import load
from sft_cli import stderr_line as _line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SFT = os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")
TINY_GRPO = os.path.join(ROOT, "jobs", "configs", "tiny-grpo.yaml")
SFT_ARGS = ["max_steps=1", "trainer.num_workers=1", "eval_accuracy.enabled=false"]


def sft(tmp_path, *overrides) -> int:
    return jobs.sft.main([TINY_SFT, f"output_dir={tmp_path / 'out'}", *SFT_ARGS, *overrides])


def grpo(tmp_path, *overrides) -> int:
    return jobs.grpo.main([TINY_GRPO, f"output_dir={tmp_path / 'out'}", *overrides])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local model folder as a user has one: config.json (tiny llama) and a tokenizer; no weights
    (the preflight never loads them)."""
    from kernels.model import hf_config
    from kernels.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("model")
    hf_config("tiny").save_pretrained(str(out))
    train_tokenizer([f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)], vocab_size=300, out_dir=str(out))
    return str(out)


# ------------------------------------------------------------------------------------- acceptance

def test_sft_model_folder_without_config_json(tmp_path, no_run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sft(tmp_path, f"model.path={empty}") == 2 and not no_run
    assert _line(capsys) == (f"preflight: model.path: '{empty}': expected a Hugging Face model folder; "
                             f"it holds no config.json")


def test_sft_missing_data_file(tmp_path, no_run, capsys):
    missing = tmp_path / "train.jsonl"
    assert sft(tmp_path, f"data.path={missing}") == 2 and not no_run
    assert _line(capsys) == f"preflight: data.path: '{missing}' does not exist"


def test_sft_lora_target_that_the_model_lacks(tmp_path, no_run, capsys):
    assert sft(tmp_path, "model.lora.target_modules=[q_proj, qkv_proj]") == 2 and not no_run
    line = _line(capsys)
    assert line.startswith("preflight: model.lora.target_modules: 'qkv_proj': expected a module name of this "
                           "llama model; its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj")


def test_grpo_unknown_reward_name(tmp_path, no_run, capsys):
    assert grpo(tmp_path, "reward.functions=[math_answer, math_answr]") == 2 and not no_run
    line = _line(capsys)
    assert line.startswith("preflight: reward.functions[1]: 'math_answr': expected a registered reward (")
    assert "math_answer" in line and "'module:function'" in line


def test_grpo_environment_that_cannot_be_made(tmp_path, no_run, capsys):
    """The environment's own check (here its timeout; the tool sandbox likewise) before Ray starts."""
    assert grpo(tmp_path, "env.name=calculator", "env.kwargs={timeout_s: 0, sandbox: unsafe}") == 2 and not no_run
    assert _line(capsys) == ("preflight: env.name: 'calculator': the environment cannot be made: "
                             "environment: timeout_s must be > 0, got 0")


def test_grpo_environment_kwargs_it_does_not_take(tmp_path, no_run, capsys):
    assert grpo(tmp_path, "env.name=calculator", "env.kwargs={turns: 3}") == 2 and not no_run
    assert _line(capsys).startswith("config error: env.kwargs: ['turns'] do not fit environment 'calculator'")


def test_one_line_exit_2_and_fast_in_a_subprocess(tmp_path):
    """The whole command, as a user runs it: Python start, imports and the check in under 10 s."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    missing = tmp_path / "nope.jsonl"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.sft", TINY_SFT, f"output_dir={tmp_path / 'x'}", *SFT_ARGS,
                           f"data.path={missing}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"preflight: data.path: '{missing}' does not exist"], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert elapsed < 10, f"{elapsed:.1f}s"


# ------------------------------------------------------------------------------------- more cases

def test_output_dir_that_is_a_file(tmp_path, no_run, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    assert jobs.sft.main([TINY_SFT, *SFT_ARGS, f"output_dir={f}"]) == 2
    assert _line(capsys) == f"preflight: output_dir: '{f}': expected a folder to write into; a file is there"
    assert jobs.sft.main([TINY_SFT, *SFT_ARGS, f"output_dir={f}/run"]) == 2
    assert f"a folder that can be created; '{f}' on its way is a file" in _line(capsys)


def test_reward_paths_and_signatures(tmp_path, monkeypatch, no_run, capsys):
    (tmp_path / "my_rewards.py").write_text(
        "def trl_style(completions, **kwargs):\n    return [0.0] * len(completions)\n"
        "def no_kwargs(prompts, completions):\n    return [0.0] * len(completions)\n"
        "def positional(prompts, completions, /, **cols):\n    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert grpo(tmp_path, "reward.functions=[not_a_module.sub:f]") == 2
    assert _line(capsys) == ("preflight: reward.functions[0]: 'not_a_module.sub:f': cannot import module "
                             "'not_a_module.sub' (No module named 'not_a_module')")
    assert grpo(tmp_path, "reward.functions=[my_rewards:missing]") == 2
    assert _line(capsys).endswith("'my_rewards:missing': module 'my_rewards' has no attribute 'missing'")
    # reward functions are called with keywords (prompts=, completions=, columns, kwargs)
    assert grpo(tmp_path, "reward.functions=[my_rewards:trl_style, my_rewards:no_kwargs]") == 2
    line = _line(capsys)
    assert line.startswith("preflight: reward.functions[1]: 'my_rewards:no_kwargs': reward 'my_rewards:no_kwargs': "
                           "takes no parameter 'completion_lengths'"), line
    assert grpo(tmp_path, "reward.functions=[my_rewards:positional]") == 2
    assert "parameter 'prompts' is positional-only" in _line(capsys)
    assert not no_run
    preflight.check_rewards(["my_rewards:trl_style", {"name": "overlong_penalty", "kwargs": {"max_len": 8}}])


def test_reward_timeout_zero_fails_at_load(tmp_path, no_run, capsys):
    assert grpo(tmp_path, "reward.timeout_s=0") == 2 and not no_run
    assert _line(capsys) == "config error: reward.timeout_s: must be > 0, got 0.0"


def test_grpo_names_the_sft_warmup_config_it_checks(tmp_path, no_run, capsys):
    assert grpo(tmp_path, f"init.sft_overrides=[data.path={tmp_path / 'gone.jsonl'}]") == 2 and not no_run
    gone = tmp_path / "gone.jsonl"
    assert _line(capsys) == f"preflight: jobs/configs/tiny-sft.yaml: data.path: '{gone}' does not exist"


def test_grpo_without_a_model_or_warmup(tmp_path, no_run, capsys):
    assert grpo(tmp_path, "init.sft_config=''") == 2 and not no_run
    assert _line(capsys).startswith("preflight: model.path: '': expected a model folder with a tokenizer")


def test_target_that_is_not_a_layer(tmp_path, no_run, capsys):
    assert sft(tmp_path, "model.lora.target_modules=[self_attn]") == 2
    assert _line(capsys).startswith("preflight: model.lora.target_modules: 'self_attn': expected a Linear, "
                                    "Embedding or Conv layer; it names a LlamaAttention")


def test_bad_config_json_and_gguf(tmp_path, no_run, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert sft(tmp_path, f"model.path={folder}") == 2
    assert _line(capsys).startswith(f"preflight: model.path: '{folder}': expected a config.json transformers can load")
    (folder / "config.json").write_text("{not json")
    assert sft(tmp_path, f"model.path={folder}") == 2
    assert _line(capsys).startswith(f"preflight: model.path: '{folder}': expected a config.json transformers can load")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    assert sft(tmp_path, f"model.path={fake}") == 2
    assert _line(capsys) == (f"preflight: model.path: '{fake}': expected a GGUF file (it does not start with "
                             f"the GGUF magic bytes)")
    fake.write_bytes(b"GGUF" + bytes(16))
    assert sft(tmp_path, f"model.path={fake}") == 0 and len(no_run) == 1   # the rest is known when it loads


def test_broken_tokenizer_folder(tmp_path, model_dir, no_run, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{broken")
    assert sft(tmp_path, f"model.path={model_dir}", f"model.tokenizer={tok}") == 2 and not no_run
    assert _line(capsys).startswith(f"preflight: model.tokenizer: '{tok}': expected a tokenizer folder that loads (")


def test_eval_data_and_out(tmp_path, model_dir, capsys):
    from jobs.eval import main

    assert main([model_dir, f"data={tmp_path / 'gsm.jsonl'}"]) == 2
    assert _line(capsys) == f"preflight: data: '{tmp_path / 'gsm.jsonl'}' does not exist"
    out = tmp_path / "res"
    out.write_text("")
    assert main([model_dir, "--out", str(out)]) == 2
    assert _line(capsys) == f"preflight: --out: '{out}': expected a folder to write into; a file is there"
    assert main([str(tmp_path)]) == 2
    assert _line(capsys).startswith(f"preflight: TARGET: '{tmp_path}': is neither a run output_dir")


# ------------------------------------------------------------------------------------- no false alarms

def test_shipped_tiny_configs_pass(tmp_path):
    from jobs.grpo import GRPOJobConfig
    from jobs.sft import SFTJobConfig

    for name in ("tiny-sft.yaml", "tiny-cpt.yaml"):
        preflight.check_sft(load(SFTJobConfig, os.path.join(ROOT, "jobs", "configs", name), [f"output_dir={tmp_path}"]))
    preflight.check_grpo(load(GRPOJobConfig, TINY_GRPO, [f"output_dir={tmp_path / 'new' / 'grpo'}"]))


def test_local_model_folder_with_tokenizer_and_data_passes(tmp_path, model_dir, no_run):
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.jsonl").write_text(json.dumps({"instruction": "1+1", "output": "2"}) + "\n")
    (data / "b.jsonl").write_text(json.dumps({"instruction": "2+2", "output": "4"}) + "\n")
    assert sft(tmp_path, f"model.path={model_dir}", f"data.path={data}/*.jsonl,{data / 'a.jsonl'}",
               "model.lora.target_modules=[q_proj, v_proj, self_attn.o_proj]") == 0
    assert len(no_run) == 1
    shutil.copy(data / "a.jsonl", data / "p.jsonl")
    assert grpo(tmp_path, f"model.path={model_dir}", f"data.path={data / 'p.jsonl'}",
                "reward.functions=[math_answer, format]") == 0
    assert len(no_run) == 2


def test_serve_vllm_engine_that_cannot_import(model_dir, monkeypatch, capsys):
    """`posttrain serve PATH engine=vllm` where Ray's ray.serve.llm does not import with the installed
    vLLM (Ray 2.60 with vLLM 0.26): one line naming the field and the fix, exit 2, before Ray starts.
    Where vLLM itself is missing (CPU, CI), the line says so. hf and vllm-async import nothing here."""
    import types

    import jobs.serve

    deployed = []

    def deploy(cfg):  # reaching it is the failure (and the command would then block)
        deployed.append(cfg)
        raise AssertionError("deploy reached: the preflight let engine=vllm through")

    monkeypatch.setattr(jobs.serve, "deploy", deploy)
    monkeypatch.delitem(sys.modules, "cluster.serve_vllm", raising=False)
    monkeypatch.setitem(sys.modules, "ray.serve.llm", None)  # `import ray.serve.llm` raises ImportError
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.26.0"))
    ray_version = preflight._dist_version("ray")
    assert jobs.serve.main([model_dir, "engine=vllm"]) == 2 and not deployed
    assert _line(capsys) == (
        f"preflight: engine: 'vllm': Ray {ray_version}'s ray.serve.llm does not import with the installed vLLM "
        f"0.26.0 (import of ray.serve.llm halted; None in sys.modules); use engine=vllm-async (this project's "
        f"app over vLLM's AsyncLLMEngine), or a Ray whose ray.serve.llm matches this vLLM")
    monkeypatch.setitem(sys.modules, "vllm", None)                # no vLLM at all
    monkeypatch.setattr(preflight, "_dist_version", lambda name: "" if name == "vllm" else ray_version)
    assert jobs.serve.main([model_dir, "engine=vllm", "--no-block"]) == 2 and not deployed
    line = _line(capsys)
    assert line.startswith(f"preflight: engine: 'vllm': Ray {ray_version}'s ray.serve.llm needs vLLM, which is "
                           f"not installed here (") and line.endswith("use engine=vllm-async, on CPU engine=hf"), line
    for engine in ("hf", "vllm-async"):  # checked without importing anything of vLLM
        preflight.check_serve(jobs.serve.load_config(model_dir, [f"engine={engine}"]))
    assert "cluster.serve_vllm" not in sys.modules
