"""python -m pallas_kernels.bench_decode_latency [--batch_sizes=1,2,4,8,16] [--contexts=576,1024,2048,4096]
    [--table_tokens=4352] [--splits=8,16,32,64] [--layers=32] [--out=PATH] [--interpret]

Paged decode attention where few sequences make it a matter of latency, not bandwidth:
the measurements behind `gpu_mosaic.latency_bound` (which calls the Mosaic GPU kernel
hands to the Triton kernel) and the Triton kernel's split count for such calls
(`gpu.default_num_splits`). One markdown table, a row per (batch, context):

- "mosaic us": paged_attention/gpu_mosaic.py at its default splits;
- "triton us": paged_attention/gpu.py at its default split count (in brackets);
- "triton splits=N us": the Triton kernel at each --splits;
- "runs": the kernel `gpu_mosaic.paged_attention` picks for that call, and whether it is
  the faster of the two defaults.

Llama-3.1-8B heads (32 query, 8 kv, head_dim 128), bf16, page 16, every sequence's table
--table_tokens wide (the engine's max_model_len: the kernels' split counts follow the
table width, the work the context); the batch's lengths differ by a few tokens. Device
time per call (the split combine included) through jax.profiler, in a jitted program
that calls the kernel once per layer over --layers distinct caches, as a decode step
does (no cache is reread from L2): pallas_kernels.bench's `measure`. Every variant's
first output is checked against the reference first ("err": relative error; "!" marks
one over bench.REL_ERR_BOUND).

`--interpret` runs tiny shapes with the kernels interpreted (a CPU smoke test of the
script, wall time: not a measurement).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels import bench
from pallas_kernels.paged_attention import gpu as triton
from pallas_kernels.paged_attention import gpu_mosaic as mosaic
from pallas_kernels.paged_attention import reference

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Options:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    contexts: tuple[int, ...] = (576, 1024, 2048, 4096)
    table_tokens: int = 4352
    splits: tuple[int, ...] = (8, 16, 32, 64)
    layers: int = 32
    reps: int = 5
    interpret: bool = False
    # Llama-3.1-8B's attention; --interpret shrinks it.
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16


TINY = dict(batch_sizes=(1, 2), contexts=(40,), table_tokens=64, splits=(2,), layers=1, reps=1, heads=4, kv_heads=2,
            head_dim=64)


def _case(opts: Options, B: int, ctx: int, key):
    S, K, H = opts.page_size, opts.kv_heads, opts.head_dim
    MP = -(-opts.table_tokens // S)
    P = B * MP + 1
    keys = jax.random.split(key, 2 * opts.layers + 1)
    q = jax.random.normal(keys[0], (B, 1, opts.heads, H), jnp.bfloat16)
    caches = [(jax.random.normal(keys[1 + 2 * i], (P, S, K, H), jnp.bfloat16),
               jax.random.normal(keys[2 + 2 * i], (P, S, K, H), jnp.bfloat16)) for i in range(opts.layers)]
    table = jnp.asarray(np.random.default_rng(ctx).permutation(P)[: B * MP].reshape(B, MP), jnp.int32)
    lens = jnp.asarray(np.minimum(ctx - np.arange(B) % 7, MP * S), jnp.int32)
    return q, caches, table, (lens - 1)[:, None], lens


def _cell(fn, case, opts: Options) -> tuple[float | None, str]:
    """(us per call or None, the table cell): pallas_kernels.bench's measurement (device
    time through jax.profiler; the host clock where there is no device trace), the
    first layer's output checked against the reference."""
    q, caches, table, pos, lens = case
    scale = opts.head_dim ** -0.5
    want = reference.paged_attention(q, *caches[0], table, pos, lens, scale=scale)
    cell = bench.measure(lambda q, t, p, n, k, v: fn(q, k, v, t, p, n, scale=scale),
                         bench.Inputs(shared=(q, table, pos, lens), per_call=list(caches),
                                      check=lambda out: bench._rel_err(out, want), reps=opts.reps))
    if cell.ms is None:
        return None, "failed"
    us = 1e3 * cell.ms
    return us, f"{us:.2f} (err {cell.rel_err:.2g}){'' if cell.ok else ' !'}"


def run(opts: Options) -> tuple[str, list[dict]]:
    """The table, and a dict per row (times in us, None where a variant failed)."""
    interpret = opts.interpret
    splits_cols = [f"triton splits={n} us" for n in opts.splits]
    head = ["batch", "context", "table", "mosaic us", "triton us (splits)", *splits_cols, "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = []
    MP = -(-opts.table_tokens // opts.page_size)
    for B in opts.batch_sizes:
        for ctx in opts.contexts:
            case = _case(opts, B, min(ctx, MP * opts.page_size), jax.random.key(1000 * B + ctx))
            q, (k, _), table = case[0], case[1][0], case[2]
            mosaic_us, mosaic_cell = _cell(
                lambda *a, **kw: mosaic.paged_attention_tuned(*a, **kw, latency_rule=False, interpret=interpret),
                case, opts)
            default_splits = triton.default_num_splits(B, opts.kv_heads, MP * opts.page_size)
            triton_us, triton_cell = _cell(
                lambda *a, **kw: triton.paged_attention_tuned(*a, **kw, interpret=interpret), case, opts)
            by_split = {}
            cells = []
            for n in opts.splits:
                us, cell = _cell(lambda *a, n=n, **kw: triton.paged_attention_tuned(*a, **kw, num_splits=n,
                                                                                     interpret=interpret), case, opts)
                by_split[n] = us
                cells.append(cell)
            picks = "triton" if mosaic.runs_triton(q, k, table) else "mosaic"
            if mosaic_us is not None and triton_us is not None:
                faster = "triton" if triton_us < mosaic_us else "mosaic"
                picks += " (faster)" if picks == faster else f" ({faster} is faster)"
            lines.append("| " + " | ".join([str(B), str(ctx), str(MP * opts.page_size), mosaic_cell,
                                            f"{triton_cell} [{default_splits}]", *cells, picks]) + " |")
            print(lines[-1], flush=True)
            rows.append(dict(batch=B, context=ctx, table=MP * opts.page_size, mosaic_us=mosaic_us, triton_us=triton_us,
                             triton_splits=default_splits, triton_by_splits=by_split, runs=picks))
    device = jax.devices()[0].device_kind
    title = (f"Paged decode at small batches on {device}, jax {jax.__version__}: {opts.heads} query / "
             f"{opts.kv_heads} kv heads, head_dim {opts.head_dim}, page {opts.page_size}, {opts.layers} layers' "
             f"caches per program, {'wall' if interpret else 'device'} us per call (combine included)")
    return "\n".join([title, "", *lines]), rows


def main(argv: Sequence[str]) -> None:
    del argv
    ints = lambda v: tuple(int(x) for x in v)  # noqa: E731
    opts = Options(batch_sizes=ints(FLAGS.batch_sizes), contexts=ints(FLAGS.contexts), table_tokens=FLAGS.table_tokens,
                   splits=ints(FLAGS.splits), layers=FLAGS.layers, reps=FLAGS.reps)
    if FLAGS.interpret:
        opts = dataclasses.replace(opts, interpret=True, **TINY)
    elif jax.default_backend() != "gpu":
        print("no GPU: run with --interpret for a smoke test", file=sys.stderr)
        sys.exit(2)
    report, _ = run(opts)
    print("\n" + report)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16"], "Sequences per call.")
    flags.DEFINE_list("contexts", ["576", "1024", "2048", "4096"], "Tokens each sequence attends to.")
    flags.DEFINE_integer("table_tokens", 4352, "Page-table width in tokens (the engine's max_model_len).")
    flags.DEFINE_list("splits", ["8", "16", "32", "64"], "Triton split counts timed besides its default.")
    flags.DEFINE_integer("layers", 32, "Distinct caches per program (the model's layers).")
    flags.DEFINE_integer("reps", 5, "Timed runs of the program.")
    flags.DEFINE_string("out", None, "Also write the table here.")
    flags.DEFINE_bool("interpret", False, "Tiny shapes, kernels interpreted (CPU smoke test).")
    app.run(main)
