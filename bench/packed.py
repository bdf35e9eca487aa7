"""The packed-weight kernel the server runs on CPUs without AMX, against the kernels it replaced.

Usage: .venv/bin/python bench/packed.py [--shape 0.5b|1.5b] [--layers 12] [--rounds 2]
Over ``--layers`` decoder layers' matrices of the shape (q/k/v fused, o, gate/up fused, down), streamed
from memory as in a step, alternating in the same run (the machine drifts), medians of 5 passes each:
- one row and 16 rows: ``linear_packed`` over the weights ``pack_bf16_`` laid out (what a layer runs once
  its block has moved into huge pages) against ``linear_bf16`` over the rows as the checkpoint stores them
  (what it ran before, and runs until its block has moved);
- prefill chunks of 32, 128 and 512 rows over four layers' matrices: ``linear_packed`` against oneDNN's
  ``F.linear`` (what prefill ran before);
- the output head (vocab x hidden) at one and 16 rows: a head tied to the embedding packs with it.
Prints GFLOP/s (2 x rows x weights per pass / time) and the ratio. The packed kernel is checked against
float32 first. Not a target: the map behind bench/decode.py's and bench/serving.py's 16-row figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import SHAPES  # noqa: E402
from bench.cpu_peak import layer_shapes, rate  # noqa: E402
from inference_core import kernels  # noqa: E402
from inference_core.model.config import ModelConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    mod = kernels.load()
    if mod is None:
        raise SystemExit(f"no CPU kernel here: {kernels.status()}")
    torch.manual_seed(0)
    w, x = torch.randn(80, 96).bfloat16(), torch.randn(19, 96).bfloat16()
    got = mod.linear_packed(x, mod.pack_bf16_(w.clone()), None).float()
    want = F.linear(x.float(), w.float())
    assert (got - want).abs().max() <= 0.01 * want.abs().max(), "linear_packed is off"
    cfg = ModelConfig.from_file(SHAPES[args.shape]() / "config.json")
    shapes = layer_shapes(cfg)
    ws = [torch.randn(n, k).bfloat16() for _ in range(args.layers) for k, n in shapes]
    packed = [mod.pack_bf16_(t.clone()) for t in ws]
    pairs = list(zip(ws, packed, strict=True))

    def compare(label: str, rows: int, mats: list[tuple[torch.Tensor, torch.Tensor]], other: str) -> None:
        xs = {t.shape[1]: torch.randn(rows, t.shape[1]).bfloat16() for t, _ in mats}
        flop = sum(2.0 * rows * t.numel() for t, _ in mats)
        base = (lambda: [mod.linear_bf16(xs[t.shape[1]], t, None) for t, _ in mats]) if other == "linear_bf16" \
            else (lambda: [F.linear(xs[t.shape[1]], t) for t, _ in mats])
        for r in range(args.rounds):
            theirs = rate(base, flop) / 1e9
            ours = rate(lambda: [mod.linear_packed(xs[t.shape[1]], p, None) for t, p in mats], flop) / 1e9
            print(f"{label}, {rows} rows (round {r + 1}): {other} {theirs:.0f} GFLOP/s, linear_packed {ours:.0f} "
                  f"GFLOP/s ({ours / theirs:.2f}x)", flush=True)

    where = f"{args.shape}, {args.layers} layers' matrices streamed"
    for rows in (1, 16):
        compare(where, rows, pairs, "linear_bf16")
    for rows in (32, 128, 512):
        compare(f"{args.shape} prefill, 4 layers' matrices", rows, pairs[:4], "oneDNN")
    del ws, packed, pairs
    head = torch.randn(cfg.vocab_size, cfg.hidden_size).bfloat16()
    for rows in (1, 16):
        compare(f"{args.shape} head {cfg.vocab_size} x {cfg.hidden_size}", rows,
                [(head, mod.pack_bf16_(head.clone()))], "linear_bf16")


if __name__ == "__main__":
    main()
