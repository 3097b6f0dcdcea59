"""Per-slot sampling inside the compiled step.

Every sampling parameter is a traced array with one entry per slot, so a batch mixes
greedy and sampled requests and changing a parameter never recompiles. Randomness is
the request's key folded with the token's position: a seeded request draws the same
tokens alone or batched, in any slot.

Order of operations (vLLM's): penalties on raw logits -> temperature -> top-k -> top-p
-> min-p -> draw (Gumbel-max over the kept tokens). Temperature 0 is greedy.
Logprobs are of the model's raw distribution (log_softmax of the unprocessed logits).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from runtime.config import SAMPLING_MODES

MAX_TOP_LOGPROBS = 20
# The sampling rows are float32 on the device, which may also flush subnormals to zero:
# a temperature or penalty past these bounds becomes inf or 0 there, and an inf or 0
# repetition penalty turns logits into NaN (0 * inf, 0 / 0), which argmax then picks.
_F32_MAX = float(np.finfo(np.float32).max)  # 3.4e38
_F32_TINY = float(np.finfo(np.float32).tiny)  # 1.2e-38, the smallest normal float32


class SamplingError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks of sampling; validated on construction (host side)."""

    temperature: float = 1.0
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens present in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # None: a random seed per request
    logprobs: int | None = None  # top-N logprobs per step (the chosen token's always)

    def __post_init__(self):
        def bad(name, value, want):
            raise SamplingError(f"{name}={value!r} is out of range; {want}")

        if not (0.0 <= self.temperature <= _F32_MAX):  # NaN fails every comparison
            bad("temperature", self.temperature, "use a value in [0, 3.4e38] (0 is greedy)")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad("top_k", self.top_k, "use an integer >= 0 (0 disables it)")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", self.top_p, "use a value in (0, 1]")
        if self.top_p < _F32_TINY:
            bad("top_p", self.top_p, "use a value in [1.2e-38, 1] (smaller ones are 0 in float32)")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", self.min_p, "use a value in [0, 1]")
        if not (_F32_TINY <= self.repetition_penalty <= _F32_MAX):
            bad("repetition_penalty", self.repetition_penalty, "use a value in [1.2e-38, 3.4e38] (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not np.isfinite(v) or not (-2.0 <= v <= 2.0):
                bad(name, v, "use a value in [-2, 2]")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            bad("seed", self.seed, "use an integer in [0, 2**63)")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            bad("logprobs", self.logprobs, f"use an integer in [0, {MAX_TOP_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The fields of a checkpoint's generation_config.json that become defaults for requests
# that leave them unset (what vLLM takes from it; do_sample is not read, as in vLLM).
GENERATION_CONFIG_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def read_sampling_defaults(directory) -> dict[str, float | int]:
    """The sampling defaults in `directory`/generation_config.json ({} without one).
    A value SamplingParams would refuse is left out with a warning: a checkpoint's typo
    must not make every request fail."""
    import json
    import logging
    from pathlib import Path

    path = Path(directory) / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logging.getLogger(__name__).warning("ignoring %s: %s", path, e)
        return {}
    defaults = {}
    for name in GENERATION_CONFIG_FIELDS:
        value = raw.get(name) if isinstance(raw, dict) else None
        if value is None or isinstance(value, bool):
            continue
        try:
            SamplingParams(**{name: value})
        except (SamplingError, TypeError) as e:
            logging.getLogger(__name__).warning("ignoring %s in %s: %s", name, path, e)
            continue
        defaults[name] = value
    return defaults


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotSampling:
    """Device arrays, one row per slot. Built on the host by `pack`."""

    temperature: jax.Array  # [B] f32
    top_k: jax.Array  # [B] i32, 0 = off
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    key: jax.Array  # [B, 2] u32, raw PRNG key data of the request

    @staticmethod
    def pack(params: list[SamplingParams | None], seeds: list[int]) -> dict[str, np.ndarray]:
        """Host arrays for a batch; None rows (idle slots) get greedy defaults."""
        default = SamplingParams(temperature=0.0)
        rows = [p or default for p in params]
        keys = np.stack([_seed_to_key(s) for s in seeds]) if seeds else np.zeros((0, 2), np.uint32)
        return dict(
            temperature=np.array([r.temperature for r in rows], np.float32),
            top_k=np.array([r.top_k for r in rows], np.int32),
            top_p=np.array([r.top_p for r in rows], np.float32),
            min_p=np.array([r.min_p for r in rows], np.float32),
            repetition_penalty=np.array([r.repetition_penalty for r in rows], np.float32),
            presence_penalty=np.array([r.presence_penalty for r in rows], np.float32),
            frequency_penalty=np.array([r.frequency_penalty for r in rows], np.float32),
            key=keys,
        )


def _seed_to_key(seed: int) -> np.ndarray:
    # Two 32-bit words of the seed: the raw data of a threefry key, built on the host.
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def apply_penalties(
    logits: jax.Array,  # [B, V] f32
    s: SlotSampling,
    prompt_mask: jax.Array,  # [B, V] bool: token occurs in the prompt
    output_counts: jax.Array,  # [B, V] i32: occurrences in the output so far
) -> jax.Array:
    seen = prompt_mask | (output_counts > 0)
    rep = s.repetition_penalty[:, None]
    # HF/vLLM: positive logits are divided by the penalty, negative ones multiplied.
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s.frequency_penalty[:, None] * output_counts.astype(logits.dtype)
    logits = logits - s.presence_penalty[:, None] * (output_counts > 0).astype(logits.dtype)
    return logits


def _filter(logits: jax.Array, s: SlotSampling) -> jax.Array:
    """top-k, top-p and min-p on temperature-scaled logits [B, V]; dropped tokens -> -inf."""
    V = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)  # [B]
    keep = logits >= jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    # top-p over the top-k survivors: keep the smallest prefix whose mass reaches p
    # (the token that crosses p stays).
    in_top_k = jnp.arange(V)[None, :] < k[:, None]
    probs_sorted = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    last_kept = jnp.sum(mass_before < s.top_p[:, None], axis=-1) - 1  # >= 0: mass_before[0] = 0
    # top_p = 1 keeps everything: a float32 cumsum reaches 1.0 before the far tail.
    top_p_off = s.top_p[:, None] >= 1.0
    keep &= top_p_off | (logits >= jnp.take_along_axis(sorted_desc, last_kept[:, None], axis=-1))
    # min-p: p(token) >= min_p * p(top token)  <=>  exp(logit - top logit) >= min_p.
    keep &= jnp.exp(logits - sorted_desc[:, :1]) >= s.min_p[:, None]
    return jnp.where(keep, logits, -jnp.inf)


# What a compiled step computes to sample (static; the host picks per call with
# `sampling_mode`, so the step has no data-dependent branch): "greedy" only argmax,
# "sample" temperature + Gumbel draw, "filter" also top-k/top-p/min-p (a sort over the
# vocabulary). Each gives every row the same token "filter" would: a row the host
# counts as greedy is greedy on the device too. Deciding on the device instead (a
# lax.cond on "any row samples") costs, on GPUs, a device-to-host read of the
# predicate: the host waits for the step's forward pass and cannot dispatch ahead
# (one-step decode calls went from 12.4 to 6.0 ms on an H200, runtime/BENCHMARKS.md).
# The names live in runtime.config (SAMPLING_MODES, EngineConfig.decode_sampling_modes).


def sampling_mode(rows, available: tuple[str, ...] = SAMPLING_MODES) -> str:
    """The cheapest mode of `available` (which has "filter") that samples `rows`
    (SamplingParams or None for idle rows) exactly."""
    drawn = [r for r in rows if r is not None and r.temperature > 0]
    if not drawn:
        need = "greedy"
    elif any(r.top_k > 0 or r.top_p < 1.0 or r.min_p > 0.0 for r in drawn):
        need = "filter"
    else:
        need = "sample"
    return next(m for m in SAMPLING_MODES[SAMPLING_MODES.index(need):] if m in available)


def sample(
    logits: jax.Array,  # [B, V] f32 raw
    s: SlotSampling,
    positions: jax.Array,  # [B] i32: position of the token being drawn
    prompt_mask: jax.Array,
    output_counts: jax.Array,
    *,
    num_top_logprobs: int = 0,
    mode: str = "filter",  # static: one of SAMPLING_MODES (see there); "filter" serves any rows
) -> dict[str, jax.Array]:
    """Draws one token per slot. Returns tokens [B], logprob [B] and, when asked,
    top_ids/top_logprobs [B, num_top_logprobs]."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r}; choose from {', '.join(SAMPLING_MODES)}")
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    x = apply_penalties(logits, s, prompt_mask, output_counts)
    greedy_tok = jnp.argmax(x, axis=-1).astype(jnp.int32)

    def draw(x, filtered: bool):
        temp = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        x = x / temp
        if filtered:
            x = _filter(x, s)  # the identity on rows that ask for no filtering
        keys = jax.vmap(lambda k, p: jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), p))(
            s.key, positions
        )
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (x.shape[-1],), jnp.float32))(keys)
        drawn = jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(s.temperature > 0, drawn, greedy_tok)

    tokens = greedy_tok if mode == "greedy" else draw(x, mode == "filter")
    out = dict(tokens=tokens, logprob=jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0])
    if num_top_logprobs:
        top_lp, top_ids = jax.lax.top_k(raw_logprobs, num_top_logprobs)
        out.update(top_ids=top_ids.astype(jnp.int32), top_logprobs=top_lp)
    return out
