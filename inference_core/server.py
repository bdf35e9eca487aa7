"""The replica process: its flags, the model's load in the background (verified, quantized, placed or
sharded as asked), and uvicorn serving ``inference_core.api``'s app meanwhile (OpenAI-compatible
completions and chat, /health, /ready, /load, /metrics, and, only with faults enabled, the drills' switch).

Run: ``python -m inference_core.server --model-dir DIR --port 8000 [--log-dir DIR] [--enable-faults]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from inference_core.api.app import create_app
from inference_core.api.guard import Guard
from inference_core.api.slot import EngineSlot
from inference_core.engine import Engine, EngineConfig
from inference_core.faults import FaultSwitch
from inference_core.integrity import MANIFEST, default_cache_dir, verify_cached
from inference_core.memory import KVCacheTooSmall, parse_bytes
from inference_core.model.placement import apply, parse_budgets, plan
from inference_core.model.quantize import quantize_int8
from inference_core.model.transformer import CausalLM
from inference_core.model.weights import load_model
from inference_core.security import Authenticator, RateLimiter, server_config
from inference_core.telemetry import BusyTracker, Metrics, request_logger, rss_bytes
from inference_core.tokenizer import TextTokenizer
from inference_core.tp_worker import Peers, load_shard

ADMIN_TOKEN_ENV = "INFERENCE_ADMIN_TOKEN"
PROXY_TOKEN_ENV = "INFERENCE_PROXY_TOKEN"  # a trusted load balancer's token (X-Sentinel-Proxy)


class IntegrityError(RuntimeError):
    """A model file does not match the directory's integrity manifest."""


def process_age(proc_root: Path = Path("/proc")) -> float:
    """Seconds since this process started (its imports included), from /proc; 0.0 where unreadable."""
    try:
        start_ticks = int((proc_root / "self" / "stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float((proc_root / "uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _exit_soon(reason: str) -> None:
    """The engine's step loop died: /health already answers 503; leave so a supervisor restarts us."""
    print(f"engine failed, exiting: {reason}", file=sys.stderr, flush=True)
    threading.Timer(0.5, os._exit, (70,)).start()  # EX_SOFTWARE, after in-flight answers are written


@dataclass(frozen=True)
class ServeSpec:
    """What to serve and how to load it (the flags that are not the engine's or the API's)."""

    model_dir: Path
    served_name: str | None = None
    log_dir: Path | None = None
    log_text: bool = False
    enable_faults: bool = False
    admin_token: str | None = None
    verify_integrity: bool = True
    integrity_cache: Path | None = None
    quantization: str | None = None
    tensor_parallel_size: int = 1
    max_memory: str | None = None
    offload_folder: Path | None = None
    tokens_as_token_ids: bool = False


class _Stages:
    """Seconds per start-up stage, for the one-line breakdown at ready."""

    def __init__(self) -> None:
        self.t0 = self.mark = time.monotonic()
        self.times: dict[str, float] = {"process start": process_age()}

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.times[stage] = now - self.mark
        self.mark = now


def _verify(spec: ServeSpec) -> None:
    """The seed's MD5 check, before serving: a file that differs from integrity.json refuses the load."""
    model_dir = spec.model_dir
    if not spec.verify_integrity or not (model_dir / MANIFEST).exists():
        return
    problems, unchanged = verify_cached(model_dir, spec.integrity_cache)
    if unchanged:
        print(f"integrity: {model_dir} unchanged since its last verification (inode, size, mtime, "
              "ctime); hashes skipped", file=sys.stderr, flush=True)
    mismatched = [p for p in problems if not p.endswith("not in the manifest")]
    for p in problems:
        print(f"integrity: {model_dir}/{p}", file=sys.stderr, flush=True)
    if mismatched:
        raise IntegrityError(f"{model_dir}/{MANIFEST}: {'; '.join(mismatched)} "
                             "(--skip-integrity-check serves it anyway)")


def _load_weights(spec: ServeSpec) -> tuple[CausalLM, Peers | None]:
    """The model (this rank's shard, with the other ranks started), quantized and placed as asked."""
    model_dir, peers = spec.model_dir, None
    if spec.tensor_parallel_size > 1:  # start ranks 1..N-1, then keep this rank's shard
        peers = Peers(model_dir, spec.tensor_parallel_size, spec.quantization)
        peers.watch(_exit_soon)
        model = load_shard(model_dir, 0, spec.tensor_parallel_size, spec.quantization)
    else:
        model = load_model(model_dir)
        if spec.quantization == "int8":
            quantize_int8(model)
    if spec.max_memory:
        placement = plan(model.config, parse_budgets(spec.max_memory), next(model.parameters()).element_size(),
                         offload=spec.offload_folder is not None)
        print(f"device map for {model_dir}:\n{placement.describe()}", file=sys.stderr, flush=True)
        apply(model, placement, spec.offload_folder)
    return model, peers


class _Loader:
    """Loads the model in the background and puts the engine in the slot (or says why it could not)."""

    def __init__(self, spec: ServeSpec, config: EngineConfig | None, slot: EngineSlot, metrics: Metrics,
                 busy: BusyTracker, faults: FaultSwitch | None) -> None:
        self.spec, self.config, self.slot, self.metrics, self.busy, self.faults = \
            spec, config, slot, metrics, busy, faults

    def __call__(self) -> None:
        spec, slot, metrics = self.spec, self.slot, self.metrics
        runtime = rss_bytes()  # the process before the weights: part of the memory plan
        stages = _Stages()
        try:
            slot.stage = "checking the files against integrity.json"
            _verify(spec)
            stages.lap("integrity")
            slot.stage = "loading the weights"
            model, peers = _load_weights(spec)
            stages.lap("weights")
            slot.stage = "loading the tokenizer"
            tokenizer = TextTokenizer.from_dir(spec.model_dir)
            stages.lap("tokenizer")
            slot.stage = "planning memory and allocating the KV cache"
            cfg = dataclasses.replace(self.config or EngineConfig(), runtime_bytes=runtime)
            engine = Engine(model, tokenizer, metrics, request_logger(spec.log_dir), self.busy, self.faults, cfg,
                            spec.log_text, on_fatal=_exit_soon, peers=peers)
        except KVCacheTooSmall as exc:  # the flags cannot work on this machine: refuse to start
            slot.load_error = f"{type(exc).__name__}: {exc}"
            print(f"cannot serve {spec.model_dir}: {exc}", file=sys.stderr, flush=True)
            threading.Timer(0.2, os._exit, (2,)).start()
            return
        except Exception as exc:  # any other load failure is reported by /health and /ready, not a crash loop
            slot.load_error = f"{type(exc).__name__}: {exc}"
            metrics.model_load_failed.set(1)
            print(f"model load failed: {slot.load_error}", file=sys.stderr, flush=True)
            return
        self._ready(engine, model, stages)

    def _ready(self, engine: Engine, model: CausalLM, stages: _Stages) -> None:
        spec, metrics = self.spec, self.metrics
        if engine.plan is not None:
            print(engine.plan.describe(), file=sys.stderr, flush=True)
        times = stages.times | engine.startup
        total = times["process start"] + time.monotonic() - stages.t0
        print(f"ready {total:.1f}s after the process started: " + ", ".join(
            f"{k} {v:.2f}s" for k, v in times.items()), file=sys.stderr, flush=True)
        metrics.model_load.set(time.monotonic() - stages.t0)
        metrics.model_info.info({"model": spec.served_name or spec.model_dir.name,
                                 "model_type": model.config.model_type,
                                 "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                                 "quantization": spec.quantization or "none",
                                 "tensor_parallel_size": str(spec.tensor_parallel_size)})
        self.slot.engine = engine


def build(spec: ServeSpec, config: EngineConfig | None = None, guard: Guard | None = None) -> FastAPI:
    """The app starts serving at once; the model loads in the background (/ready is 503 until then)."""
    registry = CollectorRegistry()
    busy = BusyTracker()
    limit = config.memory_limit if config is not None else None
    metrics = Metrics(registry, busy, memory_limit=limit)
    faults = FaultSwitch(memory_limit=limit) if spec.enable_faults else None
    slot = EngineSlot()
    load = _Loader(spec, config, slot, metrics, busy, faults)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="model-load", daemon=True).start()
        yield

    return create_app(slot, spec.served_name or spec.model_dir.name, registry, faults, spec.admin_token, lifespan,
                      guard, spec.tokens_as_token_ids)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inference_core.server", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-dir", type=Path, default=None, help="JSON request logs (default: stderr)")
    _engine_flags(p)
    p.add_argument("--quantization", choices=["int8"], default=None,
                   help="int8: weight-only, per-row int8 with fp16 scales (the seed's 25%% size)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard every layer over N processes (gloo on a CPU, nccl on GPUs)")
    p.add_argument("--skip-integrity-check", action="store_true",
                   help="serve even if files differ from the model directory's integrity.json (MD5/SHA-256)")
    p.add_argument("--integrity-cache", type=Path, default=default_cache_dir(),
                   help="remember a passed verification here and skip the hashes while the files are unchanged "
                   "(inode, size, mtime, ctime): a restart does not rehash the checkpoint (default: %(default)s)")
    p.add_argument("--no-integrity-cache", dest="integrity_cache", action="store_const", const=None,
                   help="hash every file at every start")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens 'token_id:N' (vLLM's flag; a request's return_tokens_as_token_ids "
                   "overrides it): byte tokens that are parts of one character all read as U+FFFD otherwise")
    p.add_argument("--batching", choices=["continuous", "static"], default="continuous")
    p.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run decode steps eagerly (default: replay them as CUDA graphs, padded to captured "
                   "batch sizes and context widths up to 8192 slots)")
    p.add_argument("--max-num-waiting", type=int, default=256, help="queue length before 429")
    p.add_argument("--stall-timeout", type=float, default=30.0, help="seconds without a step before /health fails")
    p.add_argument("--log-text", action="store_true", help="log completion text (off: never logged)")
    p.add_argument("--max-memory", default=None,
                   help="device budgets, e.g. cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB: layers fill them in order")
    p.add_argument("--offload-folder", type=Path, default=None, help="layers that fit no budget go here (disk)")
    _security_flags(p)
    p.add_argument("--enable-faults", action="store_true",
                   help=f"expose POST /admin/faults (needs {ADMIN_TOKEN_ENV})")
    return p


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's: batching limits, the context, the memory plan, the KV cache."""
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt + output); default: the config's, lowered to what the KV cache holds")
    p.add_argument("--memory-utilization", type=float, default=None,
                   help="share of the device's memory for weights, activations and KV cache (default 0.9 on a GPU; "
                   "on a CPU the default KV cache is what --max-num-seqs sequences of 2048 tokens need, at most "
                   "4 GiB, as vLLM's CPU backend)")
    p.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size (e.g. 4GiB), instead of sizing it from --memory-utilization")
    p.add_argument("--memory-limit", type=parse_bytes, default=None,
                   help="on a CPU, the memory this replica may use (e.g. 8GiB), when the container's cgroup does not "
                   "say: reported as memory_limit_bytes and planned against; default: the cgroup's limit, else "
                   "the host's memory")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="share the KV blocks of repeated prompt prefixes")


def _security_flags(p: argparse.ArgumentParser) -> None:
    sec = p.add_argument_group("security (the seed's section 5)")
    sec.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS, TLS 1.3 only, with this certificate")
    sec.add_argument("--tls-key", type=Path, default=None)
    sec.add_argument("--tls-client-ca", type=Path, default=None, help="mutual TLS: clients need a certificate "
                     "signed by this CA")
    sec.add_argument("--api-key-hash", action="append", default=[], metavar="SHA256",
                     help="accept the API key with this SHA-256 (hex; repeatable; `sentinel token hash` makes one)")
    sec.add_argument("--jwt-secret-env", default=None, metavar="VAR",
                     help="accept HS256 tokens signed with the secret in this environment variable")
    sec.add_argument("--jwt-public-key", type=Path, default=None, help="accept RS256/ES256 tokens (PEM)")
    sec.add_argument("--jwt-jwks", type=Path, default=None, help="accept RS256/ES256 tokens (a JWKS file)")
    sec.add_argument("--jwt-audience", default=None)
    sec.add_argument("--jwt-issuer", default=None)
    sec.add_argument("--rate-limit", type=float, default=0.0,
                     help="requests/s per client on /v1/* (the seed: 10; 0: none; sentinel starts replicas with 10)")
    sec.add_argument("--rate-burst", type=int, default=20)
    sec.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    sec.add_argument("--max-concurrent-per-client", type=int, default=0,
                     help="requests (streams included) in flight per client; 0: no limit")

def _checked(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.memory_utilization is not None and not 0.0 < args.memory_utilization <= 1.0:
        p.error(f"--memory-utilization {args.memory_utilization}: must be in (0, 1]")
    if args.memory_limit is not None and args.memory_limit <= 0:
        p.error(f"--memory-limit {args.memory_limit}: must be a positive size such as 8GiB")
    for flag in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.tensor_parallel_size < 1:
        p.error("--tensor-parallel-size must be at least 1")
    if args.tensor_parallel_size > 1 and args.max_memory:
        p.error("--tensor-parallel-size and --max-memory cannot be combined")
    if args.max_model_len is not None and args.max_model_len < 2:
        p.error("--max-model-len must be at least 2")
    if args.enable_faults and not os.environ.get(ADMIN_TOKEN_ENV):
        p.error(f"--enable-faults needs the {ADMIN_TOKEN_ENV} environment variable")
    return args


def _guard(p: argparse.ArgumentParser, args: argparse.Namespace) -> Guard:
    secret = None
    if args.jwt_secret_env:
        secret = os.environ.get(args.jwt_secret_env)
        if not secret:
            p.error(f"--jwt-secret-env {args.jwt_secret_env}: that environment variable is empty")
    try:
        auth = Authenticator.from_files(args.api_key_hash, secret, args.jwt_public_key, args.jwt_jwks,
                                        args.jwt_audience, args.jwt_issuer)
        limiter = RateLimiter(args.rate_limit, args.rate_burst) if args.rate_limit > 0 else None
    except (OSError, ValueError) as exc:
        p.error(f"security settings: {exc}")
    return Guard(auth, limiter, args.max_body_bytes, max(0, args.max_concurrent_per_client),
                 os.environ.get(PROXY_TOKEN_ENV) or None)


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = _checked(p, argv)
    cfg = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       mode=args.batching, max_num_waiting=args.max_num_waiting, stall_timeout_s=args.stall_timeout,
                       block_size=args.block_size, max_model_len=args.max_model_len,
                       memory_utilization=args.memory_utilization, kv_cache_memory=args.kv_cache_memory,
                       enable_prefix_caching=args.enable_prefix_caching, memory_limit=args.memory_limit,
                       cuda_graphs=not args.enforce_eager)
    spec = ServeSpec(args.model_dir, args.served_model_name, args.log_dir, args.log_text, args.enable_faults,
                     os.environ.get(ADMIN_TOKEN_ENV) or None, not args.skip_integrity_check, args.integrity_cache,
                     args.quantization, args.tensor_parallel_size, args.max_memory, args.offload_folder,
                     args.return_tokens_as_token_ids)
    app = build(spec, cfg, _guard(p, args))
    try:
        config = server_config(app, args.host, args.port, args.tls_cert, args.tls_key, args.tls_client_ca,
                               log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    except ValueError as exc:
        p.error(str(exc))
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
