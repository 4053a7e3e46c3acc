"""Shared fixtures. One local Ray instance per test session (starting Ray costs seconds)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the jobs' local Ray starts without its dashboard in tests (~1.5 s per start saved)
os.environ.setdefault("POSTTRAIN_DASHBOARD", "0")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests are skipped where there is no CUDA device."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by the whole session (2 CPUs, like CI)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=int(os.environ.get("TEST_RAY_CPUS", "4")), include_dashboard=False,
                 log_to_driver=True, configure_logging=False)
    yield ray
    # left running for other tests; ray shuts down at interpreter exit


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A tokenizer trained locally on the built-in task (ChatML template)."""
    from cluster.builtin_task import generate, tokenizer_corpus
    from kernels.tokenizer import train_tokenizer

    out = str(tmp_path_factory.mktemp("tokenizer"))
    train, _ = generate(400, 20, seed=123)
    train_tokenizer(tokenizer_corpus(train), vocab_size=512, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_merged_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: `tiny_merged_dir(dtype=torch.bfloat16)` -> a model folder as save_merged writes it
    (tiny preset, random weights with seed 0, the tiny tokenizer); one folder per dtype."""
    import torch

    made: dict = {}

    def make(dtype=torch.bfloat16) -> str:
        if dtype not in made:
            from kernels.model import ModelConfig, build_model, save_merged
            from kernels.tokenizer import load_tokenizer

            tok = load_tokenizer(tiny_tokenizer_dir)
            model = build_model(ModelConfig(preset="tiny"), vocab_size=len(tok), seed=0)
            out = str(tmp_path_factory.mktemp(f"tiny-merged-{str(dtype).split('.')[-1]}") / "merged")
            made[dtype] = save_merged(model, out, tokenizer=tok, dtype=dtype)
        return made[dtype]

    return make


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """The real SmolLM2-135M-Instruct from ../shared (its GGUF, converted once per session to a
    float32 model folder by kernels.model.gguf_to_folder, ~20 s); skipped where the file is absent."""
    from hub_cache import SMOLLM2_GGUF
    from kernels.model import gguf_to_folder

    if not os.path.exists(SMOLLM2_GGUF):
        pytest.skip("needs ../shared/models/smollm2-135m-instruct")
    return gguf_to_folder(SMOLLM2_GGUF, str(tmp_path_factory.mktemp("smollm2") / "model"), dtype="float32")
