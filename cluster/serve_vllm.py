"""The vllm engine: Ray's own `ray.serve.llm` (LLMServer on vLLM + OpenAiIngress).

Imported only when `engine: vllm` is asked for: `ray.serve.llm` refuses to import without
vLLM (GPU machines only), and imports only with the vLLM its Ray release was built against:
Ray 2.60's expects vLLM 0.29 (`vllm.entrypoints.serve.engine.protocol`), which the gpu extra's
vLLM 0.26 lacks, so the packaged GPU engine is `vllm-async` (cluster/serve_engines.py).
`posttrain serve` imports this module in its preflight (jobs/preflight.check_serve): where it
does not import, the command says so in one line before Ray starts.
What this module adds on top of `build_openai_app`:
- the ServeConfig -> LLMConfig translation (autoscaling, max_model_len, dtype, TP, memory);
- a LoRA adapter folder is merged once into `<adapter>-merged` (vLLM then loads one plain
  model; Ray's dynamic LoRA loading wants adapters in s3:// or gs://, not a local folder);
- the optional API key, through an OpenAiIngress subclass (`ingress_cls_config` is the
  documented extension point). FastAPI validates the body before our check runs, so a
  malformed body with a wrong key gets 400, not 401; the hf engine checks the key first.
Health: Ray's ingress has no /health route; use the proxy's `GET /-/healthz` or /v1/models.
"""
import hmac
import os

from fastapi import Request
from starlette.responses import JSONResponse

from ray.serve.llm import LLMConfig, build_openai_app
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from cluster.serve_engines import ensure_merged
from cluster.serve_openai import error_body


def _key_error(request: Request, key: str):
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return None
    msg = "Missing API key: send 'Authorization: Bearer <key>'." if not header else "Incorrect API key provided."
    return JSONResponse(error_body(msg, code="invalid_api_key"), status_code=401)


class KeyedOpenAiIngress(OpenAiIngress):
    """Ray's OpenAI ingress with a bearer-key check in front of every route we expose."""

    def __init__(self, llm_deployments, model_cards, *, api_key: str = "", api_key_env: str = "", **kw):
        super().__init__(llm_deployments, model_cards, **kw)
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else api_key
        if not self._api_key:
            raise RuntimeError(f"api_key_env: environment variable {api_key_env!r} is not set on the ingress replica")

    async def models(self, request: Request):
        return _key_error(request, self._api_key) or await super().models()

    async def model_data(self, model: str, request: Request):
        return _key_error(request, self._api_key) or await super().model_data(model)

    async def completions(self, body: CompletionRequest, request: Request):
        return _key_error(request, self._api_key) or await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        return _key_error(request, self._api_key) or await super().chat(body, request)


def llm_config(cfg) -> LLMConfig:
    path = ensure_merged(cfg.path, cfg.adapter, cfg.dtype) if cfg.adapter else cfg.path
    engine_kwargs = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "dtype": cfg.dtype,
    }
    if cfg.max_model_len:
        engine_kwargs["max_model_len"] = cfg.max_model_len
    if cfg.tokenizer:
        engine_kwargs["tokenizer"] = cfg.tokenizer
    engine_kwargs.update(cfg.engine_kwargs)
    return LLMConfig(
        runtime_env={"env_vars": dict(cfg.env_vars)} if cfg.env_vars else None,
        model_loading_config={"model_id": cfg.served_name(), "model_source": path},
        engine_kwargs=engine_kwargs,
        deployment_config={
            "autoscaling_config": cfg.autoscaling.serve_dict(),
            "max_ongoing_requests": cfg.max_ongoing_requests,
        },
    )


def build_vllm_app(cfg):
    args = {"llm_configs": [llm_config(cfg)]}
    if cfg.api_key or cfg.api_key_env:
        args["ingress_cls_config"] = {
            "ingress_cls": KeyedOpenAiIngress,
            "ingress_extra_kwargs": {"api_key": cfg.api_key, "api_key_env": cfg.api_key_env},
        }
    return build_openai_app(args)
