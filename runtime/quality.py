"""What quantization costs in quality: next-token agreement and KL divergence against the
unquantized model over a fixed English text available offline.

  python -m runtime.quality --checkpoint=smollm2-135m --modes=int8,fp8,kv_int8,kv_fp8,int8+kv_int8

The text is the Python reference documentation that CPython ships (pydoc_data.topics,
its topics in sorted order): English prose with code, the same on every machine with
the same Python minor version. It is tokenized once and cut into --windows windows of
--window tokens (the tokenizer's BOS first where it adds one); each window is one
forward pass from position 0 (teacher forcing), so --windows x (--window - 1)
positions are scored. The reference is the model at --dtype (float32 by default), its KV
cache in that dtype; each mode is the same model with its weights quantized
(runtime.quantization: int8, fp8), its KV cache quantized (runtime/kv_cache.py: kv_int8,
kv_fp8; every key and value is read back from the quantized pages, the prompt's own
included), or both ("int8+kv_int8").
Per mode, over the positions:
  agreement   share of positions where both models' most likely next token is the same
  KL          mean KL(reference || quantized) of the next-token distributions, in nats
  NLL         mean negative log-likelihood of the text's actual next token (the
              reference's in its own row): how much worse the quantized model predicts
The logits of a window stay on the device in float32; only the per-position numbers
come back, so a 262k vocabulary (Gemma 3) fits.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from runtime import flags as xflags

FLAGS = flags.FLAGS


def reference_text() -> str:
    """The fixed English text: CPython's pydoc topics, concatenated in sorted key order."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


@dataclasses.dataclass
class Score:
    mode: str
    positions: int
    agreement: float  # top-1 agreement with the reference
    kl: float  # mean KL(reference || this), nats
    nll: float  # mean NLL of the text's next token


def _reference_metrics(ref_logits, targets):
    """Per position of one window, computed once for every mode: the reference's
    log-probabilities [B, T - 1, V], its top-1 token and the NLL of the target under it."""
    import jax
    import jax.numpy as jnp

    ref_lp = jax.nn.log_softmax(ref_logits, axis=-1)
    nll = -jnp.take_along_axis(ref_lp, targets[..., None], axis=-1)[..., 0]
    return ref_lp, jnp.argmax(ref_logits, -1), nll


def _window_metrics(ref_lp, ref_top, logits, targets):
    """Per position of one window: (top-1 equal, KL(ref || q), NLL of the target under q),
    given the reference's `_reference_metrics`."""
    import jax
    import jax.numpy as jnp

    lp = jax.nn.log_softmax(logits, axis=-1)
    same = ref_top == jnp.argmax(logits, -1)
    kl = jnp.sum(jnp.exp(ref_lp) * (ref_lp - lp), axis=-1)
    nll = -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    return same, kl, nll


def _metrics_compiler_options() -> dict:
    """XLA CPU sends a sum over a product of vocabulary-sized rows to its YNNPACK reduce
    fusion, ~5x slower than its own loops here (Gemma 3's [511, 262144] rows: 3.5 s a
    window and mode, 1.0 s without): the metrics programs (no matmuls) leave YNNPACK out.
    The forward passes keep it (their matmuls run on it). Other platforms: no options."""
    import jax

    return {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}


# Cache modes: the KV cache dtype each names.
KV_MODES = {"kv_int8": "int8", "kv_fp8": "float8_e4m3fn"}


def parse_mode(mode: str) -> tuple[str | None, str | None]:
    """"int8+kv_int8" -> (weight mode, cache dtype): either may be None."""
    from runtime.quantization import MODES

    weights = cache = None
    for part in mode.split("+"):
        if part in MODES and weights is None:
            weights = part
        elif part in KV_MODES and cache is None:
            cache = KV_MODES[part]
        else:
            raise ValueError(f"mode {mode!r}: choose weight modes from {', '.join(MODES)}, cache modes from "
                             f"{', '.join(KV_MODES)}, or one of each joined by '+'")
    return weights, cache


def _window_logits(model, state, tokens):
    """float32 logits [B, T - 1, V] of tokens [B, T] (the first T - 1 positions' next-token
    predictions), each row a fresh sequence from position 0 (its own pages). model:
    (graphdef, KV cache dtype or None: the weights' dtype), static. The weights are an
    argument, not constants of the program (a constant is copied into the compiled
    program: 14 GB for Gemma 3 270M with two modes)."""
    import jax.numpy as jnp
    from flax import nnx

    from runtime.kv_cache import KVCache

    graphdef, cache_dtype = model
    page_size = 16
    B, T = tokens.shape
    pages = -(-T // page_size)
    m = nnx.merge(graphdef, state)
    cache = KVCache.create(m.cfg, num_pages=B * pages, page_size=page_size,
                           dtype=cache_dtype or m.embedding.get_value().dtype)
    table = jnp.arange(B * pages, dtype=jnp.int32).reshape(B, pages)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out, _ = m(tokens, positions, cache, table, jnp.full((B,), T, jnp.int32), fresh_prefill=True)
    return out[:, :-1].astype(jnp.float32)


def score(model, modes: list[str], token_ids: list[int], *, window: int, windows: int, batch: int = 1,
          prefix: list[int] = ()) -> tuple[Score, list[Score]]:
    """The reference's own score and each mode's against it, over `windows` windows of
    `window` tokens: `prefix` (the tokenizer's BOS, if it adds one) then the next tokens
    of `token_ids`. `model` is left unchanged (modes quantize copies)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from runtime.models.transformer import fuse_projections
    from runtime.quantization import quantize_model

    body = window - len(prefix)
    need = body * windows
    if body < 2 or len(token_ids) < need:
        raise ValueError(f"the text has {len(token_ids)} tokens; {windows} windows of {window} need {need}")
    text = np.asarray(token_ids[:need], np.int32).reshape(windows, body)
    tokens = np.concatenate([np.broadcast_to(np.asarray(prefix, np.int32), (windows, len(prefix))), text], axis=1)
    graphdef, state = nnx.split(fuse_projections(model))

    def quantized(mode):
        weights, cache = parse_mode(mode)
        # new Variables over the same arrays: quantize_model replaces the projections'
        # values in its copy only, the embedding and norms are shared with the reference
        g, s = nnx.split(quantize_model(nnx.merge(graphdef, jax.tree.map(lambda x: x, state)), weights))
        return (g, cache), s

    splits = [quantized(mode) for mode in modes]
    # One mode's logits at a time beside the reference's log-probabilities, so memory
    # does not grow with the modes; the forward passes and the metrics are separate
    # programs (different compiler options: _metrics_compiler_options).
    logits_of = jax.jit(_window_logits, static_argnums=0)
    options = _metrics_compiler_options()
    reference_metrics = jax.jit(_reference_metrics, compiler_options=options)
    metrics = jax.jit(_window_metrics, compiler_options=options)
    sums = {m: np.zeros(3) for m in ["reference", *modes]}
    count = 0
    for at in range(0, windows, batch):
        rows = jnp.asarray(tokens[at: at + batch])
        ref_lp, ref_top, reference_nll = reference_metrics(logits_of((graphdef, None), state, rows), rows[:, 1:])
        sums["reference"] += [0.0, 0.0, float(jnp.sum(reference_nll))]
        for mode, (m, s) in zip(modes, splits):
            same, kl, nll = metrics(ref_lp, ref_top, logits_of(m, s, rows), rows[:, 1:])
            sums[mode] += [float(jnp.sum(same)), float(jnp.sum(kl)), float(jnp.sum(nll))]
        count += reference_nll.size
        del ref_lp
    reference = Score("reference", count, 1.0, 0.0, sums["reference"][2] / count)
    return reference, [Score(m, count, sums[m][0] / count, sums[m][1] / count, sums[m][2] / count) for m in modes]


def format_table(name: str, dtype: str, reference: Score, scores: list[Score]) -> str:
    lines = [f"{name} ({dtype} reference), {reference.positions} positions of pydoc topics "
             f"(Python {sys.version_info.major}.{sys.version_info.minor})",
             "mode | top-1 agreement | mean KL (nats) | NLL | NLL - reference", "--- | --- | --- | --- | ---",
             f"{dtype} | 100.00% | 0 | {reference.nll:.4f} | 0"]
    for s in scores:
        lines.append(f"{s.mode} | {100 * s.agreement:.2f}% | {s.kl:.5f} | {s.nll:.4f} | {s.nll - reference.nll:+.4f}")
    return "\n".join(lines)


def define_flags() -> None:
    """The CLI's flags: defined when run, not on import (tests import this module beside
    others that define --checkpoint, --dtype and --json_out)."""
    flags.DEFINE_string("checkpoint", None, "Checkpoint directory or alias (gemma3-270m, smollm2-135m).")
    flags.DEFINE_list("modes", ["int8", "fp8"], "Quantization modes to score: weights (int8, fp8), the KV cache "
                      "(kv_int8, kv_fp8), or one of each joined by '+' (int8+kv_int8).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The reference's parameter dtype.")
    flags.DEFINE_integer("window", 512, "Tokens per forward pass.")
    flags.DEFINE_integer("windows", 8, "Windows scored (positions: windows x (window - 1)).")
    flags.DEFINE_integer("batch", 1, "Windows per forward pass.")
    flags.DEFINE_string("json_out", None, "Also write the scores here as JSON.")


def main(argv: list[str]) -> None:
    absl_logging.set_verbosity(absl_logging.WARNING)  # checkpoint restore logs at INFO
    if len(argv) > 1:
        xflags.usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.checkpoint:
        xflags.usage_error("--checkpoint is required (a directory or an alias such as smollm2-135m)")
    if not FLAGS.modes:
        xflags.usage_error("--modes is empty: name at least one mode (int8, fp8, kv_int8, kv_fp8, int8+kv_int8)")
    for mode in FLAGS.modes:
        try:
            parse_mode(mode)
        except ValueError as e:
            xflags.usage_error(f"--modes: {e}")
    if FLAGS.window < 2 or FLAGS.windows < 1 or FLAGS.batch < 1:
        xflags.usage_error("--window must be at least 2, --windows and --batch at least 1")
    import checkpoints
    from checkpoints.aliases import resolve_checkpoint
    from checkpoints.errors import CheckpointError
    from runtime.tokenizer import load_tokenizer

    try:
        directory = resolve_checkpoint(FLAGS.checkpoint, dtype=FLAGS.dtype)
        _, model = checkpoints.load(directory, dtype=FLAGS.dtype)
        tokenizer = load_tokenizer(directory)
    except CheckpointError as e:
        xflags.usage_error(str(e))
    ids = tokenizer.encode(reference_text(), add_special_tokens=False)
    prefix = tokenizer.encode("", add_special_tokens=True)  # the BOS every sequence starts with, if any
    try:
        reference, scores = score(model, FLAGS.modes, ids, window=FLAGS.window, windows=FLAGS.windows,
                                  batch=FLAGS.batch, prefix=prefix)
    except ValueError as e:
        xflags.usage_error(str(e))
    print(format_table(FLAGS.checkpoint, FLAGS.dtype, reference, scores))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump([dataclasses.asdict(s) for s in [reference, *scores]], f, indent=1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
