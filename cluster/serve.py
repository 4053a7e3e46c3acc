"""Serve a trained model on Ray Serve behind an OpenAI-compatible HTTP API.

    posttrain serve runs/sft-0001/merged                      # merged folder, hf engine, 127.0.0.1:8000
    posttrain serve base/ adapter=runs/sft-0001/adapter       # base + PEFT LoRA adapter
    posttrain serve runs/sft-0001/merged engine=vllm-async    # vLLM on GPU (the packaged GPU engine)
    serve deploy serve.yaml   # from `posttrain serve ... --emit-config serve.yaml`

Endpoints (hf and vllm-async engines): GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions (SSE with "stream": true). Errors are OpenAI-style JSON (a body over
max_request_bytes: 413; a field we do not implement: 400); nothing a client sends can take a
replica down or hold up the others (cluster/serve_http.py: the routes;
serve_openai.py: the wire format; serve_engines.py: the engines). Engines: hf (transformers,
CPU or 1 GPU), vllm-async (vLLM's AsyncLLMEngine behind the same app: the packaged GPU engine,
as in cluster/manifests/rayservice.yaml), and vllm: Ray's own `ray.serve.llm.build_openai_app`
(cluster/serve_vllm.py), for a Ray whose ray.serve.llm imports with the installed vLLM (Ray
2.60's does not with the gpu extra's vLLM 0.26; `posttrain serve` refuses it in one line then).

`app_builder` is the import path for Serve config files (`cluster.serve:app_builder`); its
`args` are the fields of `ServeConfig`.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster.serve_http import make_app
from cluster.serve_openai import DEFAULT_MAX_REQUEST_BYTES

IMPORT_PATH = "cluster.serve:app_builder"
GENERIC_DIR_NAMES = {"merged", "adapter", "model", "final", "checkpoint", "merged-4bit"}


@dataclass(frozen=True)
class AutoscalingConfig:
    """Serve autoscaling of the model deployment (min_replicas may be 0: scale to zero)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0

    def __post_init__(self):
        if self.min_replicas < 0:
            raise ValueError(f"autoscaling.min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas < 1:
            raise ValueError(f"autoscaling.max_replicas: must be >= 1, got {self.max_replicas}")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must be <= "
                             f"autoscaling.max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"autoscaling.target_ongoing_requests: must be > 0, "
                             f"got {self.target_ongoing_requests}")

    def serve_dict(self) -> dict:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "target_ongoing_requests": self.target_ongoing_requests}


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how. See docs/serving.md for every field.

    path: merged model folder, or the base model folder when `adapter` is set (vllm: also
        an HF id or s3:// URI). adapter: a PEFT LoRA folder (hf: merged at load; vllm: merged
        once into `<adapter>-merged`). tokenizer: default the adapter's, else the model's.
    engine: hf (transformers, CPU or 1 GPU) | vllm-async (GPU, this app over vLLM's
        AsyncLLMEngine: the packaged GPU engine) | vllm (GPU, Ray's ray.serve.llm: where it
        imports with the installed vLLM). model_name: the id clients send as "model" (default:
        from the folder name).
    api_key / api_key_env: require `Authorization: Bearer <key>` (the env var is read on the
        replica, so the key need not be written into a config file).
    max_model_len: prompt + completion token limit (0: the model's max_position_embeddings).
    max_request_bytes: larger request bodies are answered 413 unread (hf, vllm-async engines).
    num_cpus / num_gpus: per replica (vllm engines: GPUs = tensor_parallel_size).
    engine_kwargs: extra vLLM engine arguments. env_vars: environment of the model replicas.
    """

    path: str = ""
    adapter: str = ""
    tokenizer: str = ""
    engine: Literal["hf", "vllm", "vllm-async"] = "hf"
    model_name: str = ""
    app_name: str = "posttrain"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""
    api_key_env: str = ""
    max_model_len: int = 0
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    max_ongoing_requests: int = 32
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    engine_kwargs: dict = field(default_factory=dict)
    env_vars: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.autoscaling, dict):      # built from a plain dict (Serve config args)
            object.__setattr__(self, "autoscaling", AutoscalingConfig(**self.autoscaling))
        if not self.path:
            raise ValueError("path: required - a merged model folder, or the base model folder "
                             "when adapter is set")
        if self.engine not in ("hf", "vllm", "vllm-async"):
            raise ValueError(f"engine: {self.engine!r} is not accepted; expected 'hf', 'vllm' or 'vllm-async'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: {self.dtype!r} is not accepted; expected 'auto', 'float32', "
                             f"'bfloat16' or 'float16'")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix: must start with '/', got {self.route_prefix!r}")
        if not self.host:
            raise ValueError("host: must not be empty (127.0.0.1 for local, 0.0.0.0 for a cluster)")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        if not self.app_name:
            raise ValueError("app_name: must not be empty")
        if self.api_key and self.api_key_env:
            raise ValueError("api_key and api_key_env: set one of them, not both")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len: must be >= 0 (0 = the model's limit), got {self.max_model_len}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes: must be >= 1024 (default {DEFAULT_MAX_REQUEST_BYTES}), "
                             f"got {self.max_request_bytes}")
        if self.engine == "vllm" and self.max_request_bytes != DEFAULT_MAX_REQUEST_BYTES:
            raise ValueError("max_request_bytes: the vllm engine (Ray's ray.serve.llm app) does not "
                             "apply it; use engine=vllm-async, or limit body size in front of Serve")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus: must be >= 0, got {self.num_gpus}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size: must be >= 1, got {self.tensor_parallel_size}")
        if self.engine == "hf" and self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size: only the vllm engine shards a model; the hf engine uses 1")
        if self.engine == "hf" and self.num_gpus > 1:
            raise ValueError(f"num_gpus: the hf engine uses at most 1 GPU per replica, got {self.num_gpus}")
        if self.engine != "hf" and self.num_gpus not in (0, self.tensor_parallel_size):
            raise ValueError(f"num_gpus: the {self.engine} engine uses tensor_parallel_size "
                             f"({self.tensor_parallel_size}) GPUs per replica; leave num_gpus at 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.engine_kwargs and self.engine == "hf":
            raise ValueError("engine_kwargs: only read by the vllm and vllm-async engines")
        bad = [k for k, v in self.env_vars.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"env_vars: names and values must be strings (quote numbers in YAML); bad: {bad}")

    # -- naming, keys ---------------------------------------------------------------------
    def served_name(self) -> str:
        """The model id clients send: model_name, else e.g. 'sft-0001' for runs/sft-0001/merged."""
        if self.model_name:
            return self.model_name
        src = (self.adapter or self.path).rstrip("/")
        if self.engine != "hf" and "://" not in src and not os.path.exists(src) and src.count("/") == 1:
            return src                                   # an HF hub id (vllm)
        name = os.path.basename(src)
        parent = os.path.basename(os.path.dirname(src))
        return f"{parent}-{name}" if name in GENERIC_DIR_NAMES and parent else name

    def resolved_api_key(self) -> str:
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise RuntimeError(f"api_key_env: environment variable {self.api_key_env!r} is "
                                   f"not set on this replica")
            return key
        return self.api_key

    def url(self, host: str | None = None) -> str:
        prefix = self.route_prefix.rstrip("/")
        return f"http://{host or self.host}:{self.port}{prefix}/v1"

    # -- (de)serialisation for Serve config files ------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ServeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown serve config key(s) {unknown}; valid keys: {sorted(names)}")
        data = dict(data)
        auto = data.get("autoscaling")
        if isinstance(auto, dict):
            a_names = {f.name for f in dataclasses.fields(AutoscalingConfig)}
            bad = sorted(set(auto) - a_names)
            if bad:
                raise ValueError(f"unknown key(s) {bad} under 'autoscaling'; valid: {sorted(a_names)}")
            data["autoscaling"] = AutoscalingConfig(**auto)
        return cls(**data)


def resolve(cfg: ServeConfig) -> ServeConfig:
    """Check the folders exist here and make them absolute (replicas do not share our cwd).

    `path` pointing at an adapter folder (adapter_config.json, no config.json) is taken as
    `adapter`, with its recorded base model as `path` when that is a local folder.
    """
    def local(p: str) -> bool:
        return "://" not in p

    path, adapter, tok = cfg.path, cfg.adapter, cfg.tokenizer
    if not adapter and local(path) and os.path.isfile(os.path.join(path, "adapter_config.json")) \
            and not os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path") or ""
        if not base or not os.path.isdir(base):
            raise ValueError(f"path: {path!r} is a LoRA adapter folder and its base model "
                             f"({base or 'not recorded'!s}) is not a local folder; pass "
                             f"path=<base model folder> adapter={path}")
        path, adapter = base, cfg.path
    if cfg.engine in ("hf", "vllm-async") or os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"path: {path!r} is not a model folder (no config.json); expected a "
                             f"merged model folder, or the base model with adapter=<adapter folder>")
    if adapter:
        if local(adapter) and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise ValueError(f"adapter: {adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
    if tok and not os.path.isdir(tok):
        raise ValueError(f"tokenizer: {tok!r} is not a folder")

    def absolute(p: str) -> str:
        return os.path.abspath(p) if p and local(p) and os.path.exists(p) else p

    model_name = cfg.model_name or dataclasses.replace(cfg, path=path, adapter=adapter).served_name()
    return dataclasses.replace(cfg, path=absolute(path), adapter=absolute(adapter),
                               tokenizer=absolute(tok), model_name=model_name)


class OpenAIServer:
    """The replica: loads its engine (hf or vllm-async) once, then serves `make_app(self)`."""

    def __init__(self, config: dict):
        from cluster.serve_engines import HFEngine, VLLMAsyncEngine, ensure_merged

        cfg = self.cfg = ServeConfig.from_dict(config)
        self.api_key = cfg.resolved_api_key()
        self.model_id = cfg.served_name()
        if cfg.engine == "vllm-async":
            path = ensure_merged(cfg.path, cfg.adapter, cfg.dtype) if cfg.adapter else cfg.path
            self.engine = VLLMAsyncEngine(path, cfg.tokenizer, cfg.dtype, cfg.max_model_len,
                                          cfg.tensor_parallel_size, cfg.gpu_memory_utilization,
                                          cfg.engine_kwargs)
        else:
            self.engine = HFEngine(cfg.path, cfg.adapter, cfg.tokenizer, cfg.dtype,
                                   device="cuda" if cfg.num_gpus > 0 else "cpu",
                                   max_model_len=cfg.max_model_len)

    def __serve_build_asgi_app__(self):
        return make_app(self, max_request_bytes=self.cfg.max_request_bytes)

    def check_health(self):
        if self.engine is None:
            raise RuntimeError("engine not loaded")


# ---------------------------------------------------------------------------------------------
# Building and deploying
# ---------------------------------------------------------------------------------------------

def build_app(cfg: ServeConfig):
    """The Serve Application for `cfg` (not yet running)."""
    if cfg.engine == "vllm":
        from cluster.serve_vllm import build_vllm_app

        return build_vllm_app(cfg)
    from ray import serve

    gpus = cfg.tensor_parallel_size if cfg.engine == "vllm-async" else cfg.num_gpus
    actor_options: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": gpus}
    if cfg.env_vars:
        actor_options["runtime_env"] = {"env_vars": dict(cfg.env_vars)}
    deployment = serve.deployment(
        serve.ingress()(OpenAIServer),
        name="OpenAIServer",
        autoscaling_config=cfg.autoscaling.serve_dict(),
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options=actor_options,
    )
    return deployment.bind(cfg.to_dict())


def app_builder(args: dict):
    """Serve config-file entry point: `import_path: cluster.serve:app_builder`, args = ServeConfig."""
    return build_app(ServeConfig.from_dict(dict(args or {})))


def deploy(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on cfg.host:cfg.port, run the app, wait until healthy; return the URL.

    Uses the Ray instance already connected to, else `ray.init()` (which honours RAY_ADDRESS).
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = cfg.host
    if host in ("0.0.0.0", "::"):
        host = ray.util.get_node_ip_address()
    return cfg.url(host)


def serve_config_file(cfg: ServeConfig, proxy_location: str = "EveryNode") -> dict[str, Any]:
    """A Serve config file (`serve deploy` / RayService serveConfigV2) for `cfg`."""
    return {
        "proxy_location": proxy_location,
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": IMPORT_PATH,
            "args": cfg.to_dict(),
        }],
    }
