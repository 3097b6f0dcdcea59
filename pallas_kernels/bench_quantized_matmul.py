"""python -m pallas_kernels.bench_quantized_matmul [--rows=1,8,64,512] [--projections=...] [--sweep] [--reps=10] [--out=PATH]

Weight-only quantized projections on one GPU, in one run, as one markdown table: for
each of Llama-3.1-8B's fused projections (q/k/v 4096 -> 6144, output 4096 -> 4096,
gate/up 4096 -> 28672, down 14336 -> 4096) and each row count M (1, 8, 64: decode
batches; 512: a prefill chunk):

- "xla bf16": the bf16 weight through XLA (jnp.dot), the speed to beat;
- "xla int8" / "xla fp8": the quantized weight through XLA's fused convert
  (runtime.models.layers.project with QUANTIZED_MATMUL="xla", what --quantization ran
  before the kernel);
- "kernel int8" / "kernel fp8": pallas_kernels/quantized_matmul/gpu.py (Triton) at its
  default tiles and, with --sweep, the fastest of a few tilings (printed);
- "mosaic bf16" / "mosaic int8" / "mosaic fp8": pallas_kernels/quantized_matmul/
  gpu_mosaic.py (Hopper, M <= 64) at its default config and, with --sweep, the fastest
  of a few (printed). `--kernels` picks the kernel families;
- gate/up rows also: "xla gated" and "mosaic gated", the MLP's first half (the GEMM and
  silu(gate) * up) through XLA and through gpu_mosaic.gated_matmul.

Rates: weight bytes read per second (each call reads its weight once; x and y are
small at decode sizes) and that as a percentage of the device-to-device copy bandwidth
measured in the same run; "vs bf16" is xla bf16's time over the kernel's. Device time
through jax.profiler, calls rotating over weights together larger than L2, every
output checked against the reference first: pallas_kernels/bench.py's method (its
docstring), reused here.

`--interpret` runs tiny shapes with the kernel interpreted (a CPU smoke test of the
script, not a measurement).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

from pallas_kernels import bench
from pallas_kernels.quantized_matmul import gpu as qmm
from pallas_kernels.quantized_matmul import gpu_mosaic
from pallas_kernels.quantized_matmul import reference

FLAGS = flags.FLAGS

# Llama-3.1-8B's fused projections (D, N) as the engine runs them (GPU layouts).
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
TINY = {"qkv": (128, 192), "down": (256, 128), "gate_up": (128, 256)}
MODES = {"int8": "int8", "fp8": "float8_e4m3fn"}
MOSAIC_SWEEP = [
    {"block_n": 64, "num_splits": 1}, {"block_n": 128, "num_splits": 1}, {"block_n": 64, "num_splits": 2},
    {"block_n": 128, "num_splits": 2}, {"block_n": 128, "num_splits": 4}, {"block_k": 128},
]
SWEEP = [
    {"block_n": 64}, {"block_k": 256}, {"num_stages": 4}, {"num_warps": 8},
    {"block_n": 256, "block_k": 64}, {"num_splits": 1},
]


def _quantized(key, D: int, N: int, mode: str):
    """A random bf16 weight quantized per output channel as the runtime does."""
    from runtime.quantization import quantize

    w = bench._normal(key, (D, N), jnp.bfloat16) * jnp.bfloat16(0.02)
    return quantize(w, (0,), mode)


def _sets(weight_bytes: int, memory: int) -> int:
    """Weights per program: together at least twice the L2 (50 MB), at most ~256 MiB."""
    need = -(-2 * 50_000_000 // max(weight_bytes, 1))
    return max(1, min(need, (256 << 20) // max(weight_bytes, 1), memory // (4 * max(weight_bytes, 1))))


def _mosaic(out: dict, label: str, M: int, D: int, N: int, per_call: list, check, *, reps: int, sweep: bool,
            interpret: bool) -> None:
    """The Mosaic GPU kernel's cells: its default config and, with `sweep`, the best of
    MOSAIC_SWEEP (configs that do not tile the shape or fit shared memory are skipped)."""
    if M > gpu_mosaic.MAX_ROWS or not (interpret or gpu_mosaic.runs_here()):
        return
    wdtype = per_call[0][1].dtype
    default = gpu_mosaic.default_config(M, D, N, wdtype)
    cells = []
    for knobs in [{}] + (MOSAIC_SWEEP if sweep else []):
        config = dataclasses.replace(default, **knobs)
        if knobs:
            config = dataclasses.replace(config, stages=gpu_mosaic._stages_for(
                M, wdtype, config.block_n, config.block_k, config.num_splits))
            if config == default:
                continue
        if D % config.block_k or N % config.block_n or gpu_mosaic.smem_bytes(M, wdtype, config) > gpu_mosaic._SMEM_LIMIT:
            continue
        fn = lambda *a, config=config: gpu_mosaic.matmul_tuned(*a, interpret=interpret, config=config)  # noqa: E731
        text = f"bn{config.block_n} bk{config.block_k} st{config.stages} splits{config.num_splits}"
        cells.append(bench.measure(fn, bench.Inputs((), per_call, check, reps), text))
    out["cells"][f"mosaic {label}"] = dataclasses.asdict(cells[0])
    if sweep:
        out["cells"][f"mosaic {label} tuned"] = dataclasses.asdict(bench._best(cells))


def _gated(out: dict, M: int, per_call: list, *, reps: int, interpret: bool) -> None:
    """The MLP's first half, silu(x @ gate) * (x @ up), both ways: "xla gated" (the GEMM
    and the fusion after it, one program, as a decode step runs them) and "mosaic gated"
    (gpu_mosaic.gated_matmul, one kernel)."""
    if M > gpu_mosaic.MAX_ROWS or not (interpret or gpu_mosaic.runs_here()):
        return
    ref = jax.block_until_ready(gpu_mosaic.gated_reference(*per_call[0]))
    check = lambda y: bench._rel_err(y, ref)  # noqa: E731

    def xla(x, w):
        y = jnp.dot(x, w)
        F = w.shape[1] // 2
        return jax.nn.silu(y[:, :F]) * y[:, F:]

    out["cells"]["xla gated"] = dataclasses.asdict(bench.measure(xla, bench.Inputs((), per_call, check, reps)))
    fn = lambda x, w: gpu_mosaic.gated_matmul(x, w, interpret=interpret)  # noqa: E731
    out["cells"]["mosaic gated"] = dataclasses.asdict(bench.measure(fn, bench.Inputs((), per_call, check, reps)))


def row(name: str, D: int, N: int, M: int, *, reps: int, sweep: bool, interpret: bool, memory: int,
        kernels: Sequence[str] = ("triton", "mosaic")) -> dict:
    out: dict = {"proj": name, "D": D, "N": N, "M": M, "cells": {}}
    n = 2 if interpret else min(16, _sets(D * N, memory))
    keys = iter(jax.random.split(jax.random.key(D * 7 + N * 3 + M), 4 * n))
    xs = [bench._normal(next(keys), (M, D), jnp.bfloat16) for _ in range(n)]
    wb = [bench._normal(next(keys), (D, N), jnp.bfloat16) for _ in range(n)]
    ref = jax.block_until_ready(jnp.dot(xs[0], wb[0]))
    cell = bench.measure(jnp.dot, bench.Inputs((), list(zip(xs, wb)), lambda y: bench._rel_err(y, ref), reps))
    out["cells"]["xla bf16"] = dataclasses.asdict(cell)
    if "mosaic" in kernels:
        _mosaic(out, "bf16", M, D, N, [(x, w) for x, w in zip(xs, wb)], lambda y: bench._rel_err(y, ref),
                reps=reps, sweep=sweep, interpret=interpret)
        if name == "gate_up":
            _gated(out, M, [(x, w) for x, w in zip(xs, wb)], reps=reps, interpret=interpret)
    del wb
    for label, mode in (("int8", "int8"), ("fp8", "fp8")):
        ws = [_quantized(next(keys), D, N, mode) for _ in range(n)]
        per_call = [(x, q, s) for x, (q, s) in zip(xs, ws)]
        ref = jax.block_until_ready(reference.quantized_matmul(*per_call[0]))
        check = lambda y: bench._rel_err(y, ref)  # noqa: E731
        if not interpret:
            xla = lambda x, q, s: (jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32)  # noqa: E731
                                   * s[None, :]).astype(x.dtype)
            cell = bench.measure(xla, bench.Inputs((), per_call, check, reps))
            out["cells"][f"xla {label}"] = dataclasses.asdict(cell)
        if "mosaic" in kernels:
            _mosaic(out, label, M, D, N, per_call, check, reps=reps, sweep=sweep, interpret=interpret)
        if "triton" not in kernels:
            continue
        variants = [{}] + (SWEEP if sweep else [])
        cells = []
        for knobs in variants:
            fn = lambda x, q, s, knobs=knobs: qmm.quantized_matmul_tuned(x, q, s, interpret=interpret, **knobs)  # noqa: E731
            try:
                config = dataclasses.replace(qmm.default_config(M, D, N), **knobs)
            except TypeError:
                continue
            if D % (config.block_k * config.num_splits) or N % config.block_n:
                continue
            knob_text = (f"bm{config.block_m} bn{config.block_n} bk{config.block_k} splits{config.num_splits} "
                         f"w{config.num_warps} st{config.num_stages}")
            cells.append(bench.measure(fn, bench.Inputs((), per_call, check, reps), knob_text))
        out["cells"][f"kernel {label}"] = dataclasses.asdict(cells[0])
        if sweep:
            out["cells"][f"kernel {label} tuned"] = dataclasses.asdict(bench._best(cells))
        del ws, per_call
    return out


def _ms(cells: dict, name: str) -> float | None:
    c = cells.get(name)
    if not c or c["ms"] is None or (c["rel_err"] is not None and c["rel_err"] > bench.REL_ERR_BOUND):
        return None
    return c["ms"]


def table(rows: Sequence[dict], copy_gbs: float) -> str:
    every = ["xla bf16", "mosaic bf16", "mosaic bf16 tuned", "xla gated", "mosaic gated", "xla int8", "kernel int8", "kernel int8 tuned",
             "mosaic int8", "mosaic int8 tuned", "xla fp8", "kernel fp8", "kernel fp8 tuned", "mosaic fp8",
             "mosaic fp8 tuned"]
    cols = [c for c in every if any(c in r["cells"] for r in rows)]
    head = ["proj", "D x N", "M", *cols, "bf16 best GB/s (% copy)", "int8 best GB/s (% copy)", "int8 vs bf16",
            "fp8 vs bf16"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = r["cells"]
        texts = []
        for c in cols:
            cell = cells.get(c)
            if not cell:
                texts.append("-")
            elif cell["ms"] is None:
                texts.append(cell["error"] or "-")
            else:
                bad = cell["rel_err"] is not None and cell["rel_err"] > bench.REL_ERR_BOUND
                knobs = f" ({cell['knobs']})" if c.endswith("tuned") else ""
                texts.append(f"{cell['ms']:.4g}{knobs}" + (" !" if bad else ""))
        bf16 = _ms(cells, "xla bf16")
        best = {m: min((t for t in (_ms(cells, f"{k} {m}{t}") for k in ("kernel", "mosaic") for t in ("", " tuned"))
                        if t), default=None)
                for m in ("int8", "fp8")}
        best_bf16 = min((t for t in (_ms(cells, c) for c in ("xla bf16", "mosaic bf16", "mosaic bf16 tuned")) if t),
                        default=None)
        rates = [r["D"] * r["N"] * nbytes / (t * 1e-3) / 1e9 if t else None
                 for nbytes, t in ((2, best_bf16), (1, best["int8"]))]
        lines.append("| " + " | ".join([
            r["proj"], f"{r['D']} x {r['N']}", str(r["M"]), *texts,
            *(f"{rate:.0f} ({100 * rate / copy_gbs:.0f}%)" if rate and copy_gbs else "-" for rate in rates),
            *(f"{bf16 / best[m]:.2f}x" if bf16 and best[m] else "-" for m in ("int8", "fp8")),
        ]) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    interpret = FLAGS.interpret
    shapes = TINY if interpret else SHAPES
    ms = [int(m) for m in FLAGS.rows]
    device = jax.devices()[0]
    memory = bench._device_memory(16 << 30)
    copy_gbs = bench.copy_bandwidth(64 << 20 if interpret else 2 << 30) / 1e9
    bench._log(f"{device.device_kind}, jax {jax.__version__}, copy {copy_gbs:.0f} GB/s")
    rows = []
    for name, (D, N) in shapes.items():
        if FLAGS.projections and name not in FLAGS.projections:
            continue
        for M in ms:
            rows.append(row(name, D, N, M, reps=FLAGS.reps, sweep=FLAGS.sweep, interpret=interpret, memory=memory,
                            kernels=FLAGS.kernels))
            bench._log(json.dumps({k: v for k, v in rows[-1].items() if k != "cells"}
                                  | {k: v["ms"] for k, v in rows[-1]["cells"].items()}))
    header = (f"device: {device.device_kind}, jax {jax.__version__}; copy {copy_gbs:.0f} GB/s; ms = device time "
              f"per call; bf16 activations; ! = rel err > {bench.REL_ERR_BOUND:g}"
              + (" (INTERPRET: not a measurement)" if interpret else ""))
    print(header + "\n\n" + table(rows, copy_gbs))
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "copy_gb_per_s": copy_gbs, "rows": rows},
                      fh, indent=1)


if __name__ == "__main__":
    flags.DEFINE_list("rows", ["1", "8", "64", "512"], "Rows of x (M) per projection.")
    flags.DEFINE_list("kernels", ["triton", "mosaic"], "Kernel families to time beside XLA: triton, mosaic.")
    flags.DEFINE_list("projections", [], "Projections to time (default all): qkv, o, gate_up, down.")
    flags.DEFINE_bool("sweep", False, "Also time a few tilings of the kernel and report the fastest.")
    flags.DEFINE_integer("reps", 10, "Profiled runs of each timed program.")
    flags.DEFINE_bool("interpret", False, "Tiny shapes, kernel interpreted (CPU smoke test).")
    flags.DEFINE_string("out", None, "Write the results as JSON here.")
    app.run(main)
    sys.exit(0)
