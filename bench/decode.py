"""Single-stream decode speed: our core against transformers' ``generate`` on the same weights, and
against the memory-bandwidth bound (every weight is read once per token), all measured in one run.

Usage: .venv/bin/python bench/decode.py [--hidden 512] [--layers 8] [--tokens 64]
A random Qwen2-architecture checkpoint of the given size is written with transformers and loaded by
both. Bandwidth is the read rate of summing a 512 MiB tensor, measured here, now.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from inference_core.model import KVCache  # noqa: E402
from inference_core.quantize import weight_bytes  # noqa: E402
from inference_core.weights import load_model  # noqa: E402


def read_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times)


@torch.inference_mode()
def ours(model_dir: Path, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    model = load_model(model_dir)
    cache = KVCache.empty(model.config.num_hidden_layers)
    logits = model(prompt, torch.arange(prompt.shape[1])[None], cache)[0, -1]
    out = []
    t0 = time.perf_counter()
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        logits = model(torch.tensor([[tok]]), torch.tensor([[cache.length]]), cache)[0, -1]
    return n / (time.perf_counter() - t0), out


@torch.inference_mode()
def theirs(model: torch.nn.Module, prompt: torch.Tensor, n: int) -> tuple[float, list[int]]:
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)  # type: ignore[operator]
    elapsed = time.perf_counter() - t0
    return n / elapsed, out[0, prompt.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import transformers

    cfg = transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=8192, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model_dir = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    ref.save_pretrained(model_dir, safe_serialization=True)
    prompt = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(1))
    size = weight_bytes(load_model(model_dir))
    ours_tps, theirs_tps = [], []
    for _ in range(args.runs):
        a, toks_a = ours(model_dir, prompt, args.tokens)
        b, toks_b = theirs(ref, prompt, args.tokens)
        ours_tps.append(a)
        theirs_tps.append(b)
    bw = read_bandwidth()
    bound = bw / size
    o, t = statistics.median(ours_tps), statistics.median(theirs_tps)
    print(f"model: {size / 2**20:.0f} MiB of fp32 weights ({args.layers} layers, hidden {args.hidden}); "
          f"memory read bandwidth {bw / 1e9:.1f} GB/s -> bound {bound:.0f} tok/s")
    print(f"single-stream decode: ours {o:.1f} tok/s, transformers generate {t:.1f} tok/s "
          f"(median of {args.runs}); greedy tokens identical: {toks_a == toks_b}")
    print(f"ratio ours / transformers: {o / t:.2f}x; ours / bandwidth bound: {100 * o / bound:.0f}%")


if __name__ == "__main__":
    main()
