"""CPU kernels for the decode path, compiled once by ``scripts/setup.sh`` (``python -m inference_core.kernels``).

``linear_bf16`` multiplies a few bf16 activation rows by a bf16 weight matrix with AVX512-BF16: a decode
step's matrix-vector products, which the library path runs at about half the memory bandwidth here.
``paged_decode_attention`` is a decode step's attention read through the block tables, where the keys
and values lie in the paged pool: no per-step gather of each sequence's cache into a padded tensor.
``linear_amx`` does the same for a decode step's batch and small prefill chunks, 2..AMX_MAX_ROWS rows, with
AMX tiles: it reads the weight rows in place as the left operand of y^T = w @ x^T, where oneDNN repacks
the weights on every call.
``linear_int8`` is ``linear_bf16`` for int8 weights (1..16 rows, widened on the fly); one row multiplies on
VPDPBUSD (AVX512-VNNI) instead, over the row quantized to 16 bits and split into its bytes, with exact
integer sums: four instructions per 64 weights where widening took twelve, so it is memory-bound.
``linear_int8_amx`` is the AMX kernel for ``--quantization int8``'s layers: each 16x32 block of int8
weights is widened to bf16 (exact) just before its tile load and the sums are scaled per row, so a
decode step reads half the bytes (torch's int8 kernel, used before, barely beat bf16 here, and batches
above 4 rows dequantized each whole matrix per call).
``rms_norm_bf16``, ``silu_mul_bf16`` (``silu_mul_halves_bf16`` over a fused gate/up projection's rows)
and ``rope_bf16_`` do a layer's elementwise steps in one pass each, rounding where torch's bf16 ops round
(a dozen small torch ops per layer before).
``linear_packed`` multiplies any number of rows by bf16 weights that ``pack`` laid out at load, in place,
per 16 output features with each pair of k side by side: a GEMM micro-kernel (8 rows by 48 features in
24 accumulators) with no horizontal reductions. On CPUs without AMX it serves every row count of the
layers it packed (``bench/packed.py``, over the layers' matrices streamed from memory): 16 rows 1.12-1.41x
``linear_bf16``, one row 1.07-1.14x, the 152k-row heads 1.24-1.26x at 16 rows; prefill 1.5x oneDNN at 32
rows, 1.1x at 128, even at 512. ``embedding_packed`` reads an embedding table tied to a packed head.
``accelerate(model)`` switches a model's attention to it (bf16 on a CPU) and its bf16 CPU linear layers:
one row goes to ``linear_bf16``, 2..``AMX_MAX_ROWS`` rows to ``linear_amx`` where the CPU has AMX (or up
to ``MAX_ROWS`` rows to ``linear_bf16`` where it has not), and larger inputs (prefill) keep oneDNN's
kernels; a layer ``pack`` laid out (the engine packs each block of weights once it has moved into huge
pages) takes ``linear_packed`` for every input. Measured on this project's AMX machines over the 0.5B
shape's layer weights (700 MB, far beyond the caches), against torch's linear in the same run: one row
19 vs 13 GB/s; 16 rows 23 vs 14 GB/s with AMX (VDPBF16PS alone falls to 5 GB/s there); 32 rows 18 vs
13 GB/s; 48-96 rows 1.2-1.5x torch's speed, about even at 128-192, and behind from 256 rows on, where
oneDNN's compute-bound kernels reach 1.4-1.7 TFLOPS.
Where the CPU lacks AVX512-BF16 or the extension was not built, nothing changes and ``status()`` says why.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

log = logging.getLogger(__name__)
NAME = "inference_core_linear_bf16"
SOURCES = [Path(__file__).with_name("linear_bf16.cpp")]
BUILD_DIR = Path(sys.prefix) / "inference_core_kernels"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16",
         "-fopenmp"]
# linear_bf16 and linear_int8 where the CPU has no AMX: with their prefetch, measured on a 2-core AVX512-BF16
# host over the 0.5B shape's matrices, 0.34-0.76x the time of oneDNN's bf16 linear and 0.39-0.62x that of
# torch's int8 kernel at every row count from 2 to 16 (the kernel's limit)
MAX_ROWS = 16
# a decode step's rows that decode_layers takes where every layer is packed (above, the layers' forward)
PACKED_MAX_ROWS = 256
AMX_MAX_ROWS = 128  # above, oneDNN's kernels (compute-bound prefill) catch up and then win

_state: dict[str, Any] = {}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse) the extension under the virtual environment."""
    from torch.utils import cpp_extension

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    mod: ModuleType = cpp_extension.load(NAME, [str(s) for s in SOURCES], extra_cflags=FLAGS,
                                         extra_ldflags=["-fopenmp"], build_directory=str(BUILD_DIR), verbose=verbose)
    return mod


def load() -> ModuleType | None:
    """The compiled kernels, or None (the reason is in ``status()``). Compiles only what scripts/setup.sh
    built before: where there is no build, torch's path serves; where the sources changed since the build
    (an update without a new set-up), torch's extension loader rebuilds it here, so a stale kernel with
    other functions or semantics is never loaded."""
    if "module" in _state:
        return _state["module"]
    mod: ModuleType | None = None
    if platform_ok := {"avx512_bf16", "avx512_vnni"} <= cpu_flags():  # every AVX512-BF16 CPU has VNNI too
        if (BUILD_DIR / f"{NAME}.so").exists():
            try:
                mod = build()
                if {"amx_tile", "amx_bf16"} <= cpu_flags() and mod.amx_ready():
                    _state["amx"] = True
                    _state["reason"] = f"AVX512-BF16 linear kernel for 1 row, AMX for 2..{AMX_MAX_ROWS} rows"
                else:
                    _state["reason"] = f"AVX512-BF16 linear kernel for 1..{MAX_ROWS} rows (no AMX)"
            except Exception as exc:  # a broken build: serve on the library path, say so
                _state["reason"] = f"kernel failed to load ({type(exc).__name__}: {exc}); using torch's linear"
        else:
            _state["reason"] = f"kernel not built ({BUILD_DIR}); run scripts/setup.sh; using torch's linear"
    if not platform_ok:
        _state["reason"] = "CPU lacks AVX512-BF16 (or VNNI); using torch's linear"
    _state["module"] = mod
    return mod


def status() -> str:
    load()
    return str(_state["reason"])


def amx() -> bool:
    """Whether ``linear_amx`` can run here (the CPU has AMX and the kernel granted the tile state)."""
    load()
    return bool(_state.get("amx"))


class FastLinear(nn.Linear):
    """nn.Linear whose bf16 CPU forward for a decode step's rows runs this module's kernels."""

    kernel: Any = None
    amx_rows = 0  # up to this many rows go to linear_amx (0: this layer's shape or the CPU rules it out)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dim() == 4:  # packed at load (``pack``): every row count on the packed kernel
            if x.dtype == torch.bfloat16 and x.device.type == "cpu":
                return self.kernel.linear_packed(x, self.weight, self.bias)
            return F.linear(x, self.kernel.unpack_bf16(self.weight).to(x.dtype), self.bias)  # other dtypes: a copy
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.weight.is_contiguous():
            rows = x.numel() // x.shape[-1]
            if 2 <= rows <= self.amx_rows:
                return self.kernel.linear_amx(x, self.weight, self.bias)
            if rows <= MAX_ROWS and (rows == 1 or not self.amx_rows):
                return self.kernel.linear_bf16(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class FastEmbedding(nn.Embedding):
    """nn.Embedding that also reads its table once ``pack`` laid it out for a tied output head."""

    kernel: Any = None

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Embedding's name)
        if self.weight.dim() == 4:
            return self.kernel.embedding_packed(input, self.weight)
        return super().forward(input)


def linear_spec(m: nn.Module | None) -> tuple[list[Tensor | None], int] | None:
    """A linear layer as ``decode_layers`` takes it ([weight, int8 row scales or None, bias or None]) and the most
    rows for which its own forward would run the same kernel (``linear_bf16`` or ``linear_int8``); None where
    its forward takes another path (no kernel, AMX for every batch, torch's)."""
    if isinstance(m, FastLinear) and m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous() \
            and m.weight.device.type == "cpu":
        if m.weight.dim() == 4:  # packed: the same kernel at every row count
            return [m.weight, None, m.bias], PACKED_MAX_ROWS
        return [m.weight, None, m.bias], 1 if m.amx_rows else MAX_ROWS
    q = getattr(m, "qweight", None)
    if m is not None and getattr(m, "int8_kernel", None) is not None and isinstance(q, Tensor) and q.is_contiguous():
        rows = 1 if getattr(m, "int8_tiles", False) else min(MAX_ROWS, int(getattr(m, "int8_kernel_rows", 0)))
        return [q, getattr(m, "scale"), getattr(m, "bias", None)], rows  # noqa: B009
    return None


def fused_modules(model: nn.Module) -> list[nn.Module]:
    """The fused q/k/v and gate/up layers (bf16 or int8): held by their layers, not registered as submodules."""
    return [f for m in model.modules() for name in getattr(m, "fusion_groups", dict)()
            if isinstance(f := vars(m).get(name), nn.Module)]


def packable(m: nn.Module) -> bool:
    """A bf16 CPU ``FastLinear`` whose weights ``pack`` may lay out for ``linear_packed``: on CPUs without AMX
    (AMX's kernels read the rows in place), out-features a multiple of 16, even in-features."""
    w = getattr(m, "weight", None)
    return isinstance(m, FastLinear) and isinstance(w, Tensor) and not amx() and w.dim() == 2 \
        and w.dtype == torch.bfloat16 and w.device.type == "cpu" and w.is_contiguous() \
        and m.out_features % 16 == 0 and m.in_features % 2 == 0


def pack(model: nn.Module, within: nn.Module | None = None) -> int:
    """Pack, in place, the weights of ``within``'s (default: the whole model's) ``FastLinear`` layers, the fused
    ones included, for ``linear_packed`` ([N/16][K/2][16][2]; each layer's ``weight`` becomes that 4-d view of
    the same bytes). Layers whose weights overlap (a fused layer and its parts) are packed as one matrix, per
    block of 16 rows, and all re-viewed; only where every one of them can read the packed layout (each
    ``packable``, starting on a block of 16 rows), where no other module holds those bytes except an embedding
    table tied to the layer (a ``FastEmbedding`` holding the very same parameter reads it packed), and where
    no file map holds them (``model.mmaps``: a page written there would turn a shared page of the file into
    a private copy, and one the kernel drops would come back from the file unpacked; the engine packs each
    block once it has moved into huge pages). Returns the bytes packed."""
    mod = load()
    if mod is None or amx():
        return 0
    scope = within if within is not None else model
    held: list[tuple[int, int, Tensor | None]] = []  # bytes others hold: (start, end, a tied table or None)
    for m in model.modules():
        if not isinstance(m, nn.Linear):
            tied = type(m) is FastEmbedding and m.padding_idx is None and m.max_norm is None
            held += [(p.data_ptr(), p.data_ptr() + p.nbytes, p if tied else None) for p in m.parameters(recurse=False)]
    for mm in getattr(model, "mmaps", []):
        if len(mm):
            base = torch.frombuffer(mm, dtype=torch.uint8).data_ptr()
            held.append((base, base + len(mm), None))
    layers: list[nn.Linear] = [m for m in {id(m): m for m in [*scope.modules(), *fused_modules(scope)]}.values()
              if isinstance(m, nn.Linear) and m.weight.dim() == 2 and m.weight.device.type == "cpu"]
    spans = sorted(((m.weight.data_ptr(), m.weight.data_ptr() + m.weight.nbytes, m) for m in layers),
                   key=lambda s: (s[0], -s[1]))
    clusters: list[tuple[int, int, list[tuple[int, int, nn.Linear]]]] = []  # (start, end, the layers in it)
    for span in spans:  # layers whose bytes overlap, together
        if clusters and span[0] < clusters[-1][1]:
            lo, hi, members = clusters[-1]
            clusters[-1] = (lo, max(hi, span[1]), [*members, span])
        else:
            clusters.append((span[0], span[1], [span]))
    done = 0
    with torch.no_grad():
        for lo, hi, cluster in clusters:
            whole = next((m for s, e, m in cluster if s == lo and e == hi), None)
            if whole is None or any(a < hi and lo < b and t is not whole.weight for a, b, t in held):
                continue
            block = 16 * whole.weight.shape[1] * whole.weight.element_size()
            if not all(packable(m) and m.weight.shape[1] == whole.weight.shape[1] and (s - lo) % block == 0
                       for s, _, m in cluster):
                continue
            mod.pack_bf16_(whole.weight.data)
            for _, _, m in cluster:
                w = m.weight
                m.weight.data = w.data.view(w.shape[0] // 16, w.shape[1] // 2, 16, 2)
            done += hi - lo
    return done


def accelerate(model: nn.Module) -> int:
    """Switch every bf16 CPU ``nn.Linear`` of ``model`` to ``FastLinear`` (same parameters, same state dict),
    its bf16 CPU attention to the paged decode kernel and the fused rotary embedding, and its RMSNorms and
    MLPs to the fused elementwise kernels. Returns how many linear layers were switched (0
    where the kernels are unavailable)."""
    mod = load()
    if mod is None:
        return 0
    FastLinear.kernel = FastEmbedding.kernel = mod
    n = 0
    for m in [*model.modules(), *fused_modules(model)]:
        if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.__class__ = FastLinear
            if amx() and m.in_features % 32 == 0 and m.out_features % 16 == 0:  # linear_amx's tile shapes
                vars(m)["amx_rows"] = AMX_MAX_ROWS
            n += 1
        elif type(m) is nn.Embedding and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu":
            m.__class__ = FastEmbedding  # the same table; reads it packed where pack laid it out for a tied head
        elif not all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters()):
            continue
        elif hasattr(m, "int8_kernel") and isinstance(q := getattr(m, "qweight", None), Tensor):  # weight-only int8
            if q.dim() == 2 and q.is_contiguous():  # one row: linear_int8; 2.. rows: linear_int8_amx's tiles
                tiles = amx() and q.shape[1] % 32 == 0 and q.shape[0] % 16 == 0
                vars(m)["int8_kernel"], vars(m)["int8_kernel_rows"] = mod, AMX_MAX_ROWS if tiles else MAX_ROWS
                vars(m)["int8_tiles"] = tiles
        elif hasattr(m, "decode_kernel"):
            vars(m)["decode_kernel"] = mod  # bf16 decode attention through the block tables (no gather), RoPE
        elif hasattr(m, "fused_kernel"):
            vars(m)["fused_kernel"] = mod  # RMSNorm, SiLU * up in one pass each
    return n

