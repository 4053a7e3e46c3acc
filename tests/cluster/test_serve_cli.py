"""`posttrain serve` as a user runs it: a subprocess, answered through the official openai client
(helpers in tests/serve_cli.py, shared with the GPU variant in tests/cluster/test_serve_gpu.py)."""
from __future__ import annotations

import os
import time

import pytest
from serve_cli import check_chat, check_logprobs, check_models, check_stream, client_for, load_round, serve_cli


# ----------------------------------------------------------------------------------- CPU: hf engine

def test_cli_serve_hf_openai(tiny_merged_dir):
    """`posttrain serve FOLDER` (hf engine, CPU) in a subprocess: (a) chat, (b) stream, (c) logprobs,
    4 clients x 3 requests without errors, and Ctrl-C stops it with exit code 0."""
    pytest.importorskip("openai")
    model = "tiny-cli"
    with serve_cli(tiny_merged_dir(), "engine=hf", f"model_name={model}", "max_model_len=128", "num_cpus=1",
                   "autoscaling.target_ongoing_requests=16") as server:
        client = client_for(server, timeout=60)
        check_models(client, model)
        check_chat(client, model, max_tokens=6)
        check_stream(client, model, max_tokens=6)
        check_logprobs(client, model, top=2, max_tokens=4)
        figures = load_round(server, model, clients=4, requests=3, max_tokens=4, timeout=60)
        print(f"[serve-cli] hf, CPU: {figures}")
        assert figures["errors"] == 0, figures["error_examples"]
        assert figures["answered"] == 12 and figures["completion_tokens"] > 0
        t = time.perf_counter()
        rc = server.stop()
        print(f"[serve-cli] stopped in {time.perf_counter() - t:.1f} s, exit code {rc}")
        assert rc == 0, server.tail()
        with open(os.path.join(server.log_dir, "stdout")) as f:
            assert "stopping..." in f.read()
