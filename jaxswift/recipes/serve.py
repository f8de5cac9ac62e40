"""Serve a model over OpenAI's HTTP API: `python -m jaxswift.recipes.serve --model smollm2-135m-instruct` (alias
`jaxswift deploy`). `--adapters name=DIR ...` serves each PEFT LoRA adapter as its own model id on the same base,
mixed in one batch. Then: `curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", ...}]}'`.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Optional

import numpy as np

from jaxswift.errors import ConfigError
from jaxswift.recipes.common import run_main

log = logging.getLogger(__name__)
DEFAULT_MAX_IMAGE_PIXELS = 32 * 1024 * 1024  # serve/openai.py's MAX_IMAGE_PIXELS (not imported: FastAPI loads late)


@dataclasses.dataclass
class ServeArguments:
    model: str = field(default="smollm2-135m-instruct", metadata={"help": "HF folder, .gguf file or embedded name"})
    adapters: list[str] = field(default_factory=list, metadata={"help": "name=DIR PEFT LoRA adapters, one model "
                                                                        "id each"})
    served_model_name: Optional[str] = field(default=None, metadata={"help": "model id of the base; unset: "
                                                                              "the --model text"})
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = field(default=8, metadata={"help": "requests decoded together (engine slots)"})
    max_model_len: int = field(default=2048, metadata={"help": "prompt + completion tokens per request"})
    page_size: int = field(default=16, metadata={"help": "tokens per KV-cache page"})
    num_pages: Optional[int] = field(default=None, metadata={"help": "KV-cache pages; unset: every slot full"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse the KV pages of prompt prefixes "
                                                                         "seen before (--no_enable_prefix_caching: "
                                                                         "off)"})
    max_num_batched_tokens: Optional[int] = field(default=None, metadata={
        "help": "chunked prefill: at most this many prompt tokens run between two decode steps, so a long prompt "
                "does not stall the running streams (a multiple of --page_size); unset: whole prompts"})
    mesh: Optional[str] = field(default=None, metadata={
        "help": "shard the model and its KV cache over devices: tensor=4 or data=2,tensor=4 (heads, kv heads and "
                "the MLP over tensor); on CPU the virtual devices are made; unset: one device"})
    coordinator_address: Optional[str] = field(default=None, metadata={
        "help": "multi-process serving: HOST:PORT of process 0 (which answers HTTP; the others run its engine calls "
                "on their devices of the --mesh)"})
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    warmup: bool = field(default=True, metadata={"help": "compile the engine's shapes before serving "
                                                         "(--no_warmup: compile on first use)"})
    dtype: Optional[str] = None
    quant_method: Optional[str] = field(default=None, metadata={"help": "int8 | nf4: quantize a float model's "
                                                                       "projections on load"})
    api_key: list[str] = field(default_factory=list, metadata={"help": "accepted Bearer keys (none: no auth)"})
    rate_limit: Optional[str] = field(default=None, metadata={"help": "per client, e.g. 60/minute"})
    max_concurrency: Optional[int] = field(default=None, metadata={"help": "requests in flight per client"})
    max_queue: int = field(default=256, metadata={"help": "waiting requests before 429"})
    request_timeout: Optional[float] = field(default=600.0, metadata={"help": "seconds per request"})
    log_level: str = "info"
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata={
        "help": "vision-language models: a request's image of more pixels (width x height) gets a 400"})
    # embedding models (/v1/embeddings): unset, a folder with sentence-transformers' modules.json is one
    task_type: Optional[str] = field(default=None, metadata={
        "help": "causal_lm | embedding (default: embedding for a folder with modules.json, else causal_lm)"})
    embedding_pooling: Optional[str] = field(default=None, metadata={
        "help": "embedding: last | mean (default: the folder's 1_Pooling/config.json, else last)"})
    embedding_normalize: Optional[bool] = field(default=None, metadata={
        "help": "embedding: L2-normalise the vectors (default: the folder's modules.json, else true)"})
    config: Optional[str] = None

    def __post_init__(self):
        if self.task_type not in (None, "causal_lm", "embedding"):
            raise ConfigError(f"--task_type {self.task_type!r}: expected causal_lm | embedding")
        for name in ("port", "max_num_seqs", "max_model_len", "page_size", "max_queue", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")
        check_quant_method(self.quant_method)
        budget = self.max_num_batched_tokens
        if budget is not None and (budget < self.page_size or budget % self.page_size):
            raise ConfigError(f"--max_num_batched_tokens must be a positive multiple of --page_size "
                              f"({self.page_size}), got {budget}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ConfigError(f"--request_timeout must be positive, got {self.request_timeout}")


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`name=DIR` pairs -> {name: DIR}; a ConfigError names the bad one."""
    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"--adapters {spec!r}: expected NAME=DIR (a PEFT adapter folder)")
        if name in out:
            raise ConfigError(f"--adapters: the name {name!r} is given twice")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapters {spec!r}: {folder} has no adapter_config.json")
        out[name] = folder
    return out


def check_quant_method(method: Optional[str]):
    from jaxswift.quant.nf4 import QUANT_METHODS

    if method is not None and method not in QUANT_METHODS:
        raise ConfigError(f"--quant_method {method!r}: expected {' | '.join(QUANT_METHODS)} (quantize on load), or "
                          "none to serve the folder as it is (GPTQ / AWQ / int8 / FP8 folders load quantized)")


def load_for_inference(name: str, dtype: Optional[str], quant_method: Optional[str], **kw):
    """jaxswift.load_model, then the params the engine runs (quant.serving.inference_params)."""
    import jaxswift
    from jaxswift.quant.serving import inference_params

    model = jaxswift.load_model(name, dtype=dtype, **kw)
    if quant_method is not None and model.is_vlm:
        raise ConfigError(f"--quant_method: {name} is a vision-language model; quantizing on load covers text models")
    if model.is_vlm:
        return model
    return dataclasses.replace(model, params=inference_params(model.params, model.config, quant_method,
                                                              f"--model {name}"))


def serving_mesh(spec: Optional[str]):
    """--mesh -> the engine's Mesh (None: one device); the engine refuses axes other than data and tensor."""
    from jaxswift.parallel.mesh import make_mesh

    return make_mesh(spec) if spec else None


def build_server(args: ServeArguments):
    """(FastAPI app, orchestrator) for the arguments; the caller runs uvicorn and shuts the orchestrator down. An
    embedding model has no orchestrator (None): its app embeds in a worker thread (build_embedding_server)."""
    from jaxswift.infer.orchestrator import Orchestrator
    from jaxswift.serve.limits import parse_rate_limit
    from jaxswift.serve.openai import build_app

    if args.rate_limit:
        parse_rate_limit(args.rate_limit)  # a bad flag fails before the model loads
    spec = embedding_spec(args)
    if spec is not None:
        return build_embedding_server(args, spec), None
    adapters = parse_adapters(args.adapters)
    model = load_for_inference(args.model, args.dtype, args.quant_method)
    if model.tokenizer is None:
        raise ConfigError(f"--model {args.model}: no tokenizer found; the server needs one")
    if model.head is not None:
        return build_classifier_server(args, model)
    if args.max_image_pixels != DEFAULT_MAX_IMAGE_PIXELS and not model.is_vlm:
        raise ConfigError(f"--max_image_pixels: {args.model} is a text-only model (it takes no images)")
    engine = build_engine(args, model, adapters)
    orchestrator = Orchestrator(engine, max_queue=args.max_queue, request_timeout=args.request_timeout)
    app = build_app(orchestrator, model_name=args.served_model_name or args.model, adapter_names=list(adapters),
                    api_keys=args.api_key, rate_limit=args.rate_limit, max_concurrency=args.max_concurrency,
                    max_image_pixels=args.max_image_pixels)
    return app, orchestrator


def build_engine(args: ServeArguments, model, adapters: dict[str, str], seed: Optional[int] = None):
    """The generation engine of the flags, warmed up (before an orchestrator's thread owns it) unless
    --no_warmup."""
    from jaxswift.infer.engine import JaxEngine

    engine = JaxEngine(model, max_concurrent_decodes=args.max_num_seqs, max_model_len=args.max_model_len,
                       page_size=args.page_size, num_pages=args.num_pages, adapters=adapters or None,
                       enable_prefix_caching=args.enable_prefix_caching,
                       max_num_batched_tokens=args.max_num_batched_tokens, mesh=serving_mesh(args.mesh), seed=seed)
    if args.warmup:
        started = time.perf_counter()
        engine.warmup()
        log.info("warmup: compiled the engine's shapes in %.1f s", time.perf_counter() - started)
    return engine


def serve_from_processes(args: ServeArguments) -> int:
    """One engine per process over the global --mesh (infer/mirror.py): process 0 answers HTTP and sends its
    engine calls to the others, which replay them until it stops."""
    import jax

    from jaxswift.infer.mirror import Channel, MirroredEngine, follow
    from jaxswift.infer.orchestrator import Orchestrator
    from jaxswift.serve.openai import build_app

    if args.mesh is None:
        raise ConfigError("multi-process serving needs --mesh (the devices of all processes, e.g. "
                          "data=2,tensor=4): without it each process would serve alone")
    if embedding_spec(args) is not None:
        raise ConfigError("multi-process serving covers generative models; an embedding model serves from one "
                          "process")
    if args.rate_limit:
        from jaxswift.serve.limits import parse_rate_limit

        parse_rate_limit(args.rate_limit)
    adapters = parse_adapters(args.adapters)
    channel = Channel.open(args.coordinator_address.rpartition(":")[0] if args.coordinator_address else None)
    leader = jax.process_index() == 0
    if leader:  # one sampling seed for every engine: requests without a seed sample alike everywhere
        seed = int(np.random.default_rng().integers(0, 1 << 63))
        channel.send(seed)
    else:
        seed = channel.receive()
    model = load_for_inference(args.model, args.dtype, args.quant_method)
    if model.tokenizer is None or model.head is not None:
        raise ConfigError(f"--model {args.model}: multi-process serving needs a generative model with a tokenizer")
    engine = build_engine(args, model, adapters, seed=seed)
    if not leader:
        follow(engine, channel)
        return 0
    mirrored = MirroredEngine(engine, channel)
    orchestrator = Orchestrator(mirrored, max_queue=args.max_queue, request_timeout=args.request_timeout)
    app = build_app(orchestrator, model_name=args.served_model_name or args.model, adapter_names=list(adapters),
                    api_keys=args.api_key, rate_limit=args.rate_limit, max_concurrency=args.max_concurrency,
                    max_image_pixels=args.max_image_pixels)
    import uvicorn

    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        orchestrator.shutdown()
        mirrored.close()
    return 0


# Generation-engine flags an embedding server has no use for (flag -> its default): refused when given.
ENGINE_ONLY = {"adapters": [], "num_pages": None, "max_num_batched_tokens": None, "page_size": 16,
               "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS, "max_queue": 256, "enable_prefix_caching": True,
               "request_timeout": 600.0, "mesh": None}  # mesh: the embedding server runs on one device so far


def embedding_spec(args: ServeArguments):
    """The EmbeddingSpec to serve --model with, or None for a generative model: --task_type, else the folder's
    sentence-transformers marker; --embedding_pooling / --embedding_normalize override the folder's."""
    from jaxswift.infer.embedding import EmbeddingSpec, read_embedding_spec

    marked = read_embedding_spec(args.model)
    task = args.task_type or ("embedding" if marked is not None else "causal_lm")
    if task != "embedding":
        given = [n for n in ("embedding_pooling", "embedding_normalize") if getattr(args, n) is not None]
        if given:
            raise ConfigError(f"--{given[0]}: needs an embedding model (--task_type embedding)")
        return None
    for name, default in ENGINE_ONLY.items():
        if getattr(args, name) != default:
            raise ConfigError(f"--{name} is a generation-engine flag; an embedding model does not use it")
    base = marked or EmbeddingSpec()
    return EmbeddingSpec(args.embedding_pooling or base.pooling,
                         base.normalize if args.embedding_normalize is None else args.embedding_normalize)


def build_embedding_server(args: ServeArguments, spec):
    """The /v1/embeddings app: --max_num_seqs inputs per forward, inputs of at most --max_model_len tokens."""
    from jaxswift.infer.embedding import Embedder
    from jaxswift.serve.openai import build_embedding_app

    model = load_for_inference(args.model, args.dtype, args.quant_method)
    embedder = Embedder(model, spec, max_length=args.max_model_len, max_batch=args.max_num_seqs)
    if args.warmup:
        started = time.perf_counter()
        embedder.warmup()
        log.info("warmup: compiled %d embedding shapes in %.1f s", len(embedder.shapes()),
                 time.perf_counter() - started)
    return build_embedding_app(embedder, model_name=args.served_model_name or args.model, api_keys=args.api_key,
                               rate_limit=args.rate_limit, max_concurrency=args.max_concurrency)


# What a sequence classifier's server reads of the flags; the generation engine's flags are refused for it.
CLASSIFIER_FLAGS = ("model", "served_model_name", "host", "port", "max_model_len", "dtype", "api_key", "log_level",
                    "config")


def build_classifier_server(args: ServeArguments, model):
    """(app, scorer) of a sequence classifier / reranker folder: /v1/classify, /v1/rerank, /v1/score."""
    from jaxswift.infer.classify import SequenceScorer
    from jaxswift.serve.openai import build_classifier_app

    defaults = ServeArguments()
    given = [f"--{f.name}" for f in dataclasses.fields(args)
             if f.name not in CLASSIFIER_FLAGS and getattr(args, f.name) != getattr(defaults, f.name)]
    if given:
        raise ConfigError(f"{', '.join(given)}: --model {args.model} is a sequence classifier, served without the "
                          "generation engine these flags configure")
    scorer = SequenceScorer(model, max_length=args.max_model_len)
    app = build_classifier_app(scorer, model_name=args.served_model_name or args.model, api_keys=args.api_key)
    return app, scorer


def main(argv: list[str]) -> int:
    import uvicorn

    from jaxswift.train.args import parse_args

    args = parse_args(ServeArguments, argv)
    from jaxswift.parallel.distributed import initialize_distributed

    # before JAX starts: joins a multi-process job if asked, and makes the mesh's virtual devices on a CPU machine
    if initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, mesh=args.mesh) > 1:
        return serve_from_processes(args)
    app, orchestrator = build_server(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if orchestrator is not None:
            orchestrator.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
