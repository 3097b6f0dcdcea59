"""Sampling against transformers' logits processors and against its own definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runtime.sampling import (
    SAMPLING_MODES,
    SamplingError,
    SamplingParams,
    SlotSampling,
    _filter,
    apply_penalties,
    sample,
    sampling_mode,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def slots(params, seeds=None):
    seeds = seeds if seeds is not None else list(range(len(params)))
    return SlotSampling(**{k: jnp.asarray(v) for k, v in SlotSampling.pack(params, seeds).items()})


def hf_kept(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Which tokens transformers' warpers keep, applied in generate()'s order."""
    from transformers.generation import logits_process as lp

    x = torch.tensor(logits)[None] / p.temperature
    ids = torch.zeros((1, 1), dtype=torch.long)
    if p.top_k:
        x = lp.TopKLogitsWarper(p.top_k)(ids, x)
    if p.top_p < 1.0:
        x = lp.TopPLogitsWarper(p.top_p)(ids, x)
    if p.min_p > 0.0:
        x = lp.MinPLogitsWarper(p.min_p)(ids, x)
    return torch.isfinite(x)[0].numpy()


@pytest.mark.parametrize("seed", range(6))
def test_filters_keep_the_same_tokens_as_transformers(seed):
    rng = np.random.default_rng(seed)
    V = 257
    cases = [
        SamplingParams(temperature=0.8, top_k=int(rng.integers(1, V))),
        SamplingParams(temperature=1.3, top_p=float(rng.uniform(0.05, 0.99))),
        SamplingParams(temperature=0.6, min_p=float(rng.uniform(0.01, 0.5))),
        SamplingParams(temperature=1.0, top_k=40, top_p=0.7, min_p=0.02),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0),
    ]
    logits = rng.normal(size=(len(cases), V)).astype(np.float32) * 3
    s = slots(cases)
    temps = np.array([c.temperature for c in cases], np.float32)[:, None]
    ours = np.isfinite(np.asarray(_filter(jnp.asarray(logits / temps), s)))
    for i, c in enumerate(cases):
        np.testing.assert_array_equal(ours[i], hf_kept(logits[i], c), err_msg=str(c))


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    V = 50
    logits = rng.normal(size=(1, V)).astype(np.float32)
    prompt, output = [3, 7, 7, 11], [11, 20, 20, 20]
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), torch.tensor(logits)).numpy()
    prompt_mask = np.zeros((1, V), bool)
    prompt_mask[0, prompt] = True
    counts = np.bincount(output, minlength=V)[None].astype(np.int32)
    got = apply_penalties(jnp.asarray(logits), slots([SamplingParams(repetition_penalty=1.7)]),
                          jnp.asarray(prompt_mask), jnp.asarray(counts))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_presence_and_frequency_penalties_follow_their_definition():
    """OpenAI/vLLM: logit - frequency * count - presence * [count > 0], output tokens only."""
    V = 10
    logits = np.linspace(-1, 1, V, dtype=np.float32)[None]
    counts = np.array([[0, 1, 3, 0, 0, 0, 2, 0, 0, 0]], np.int32)
    prompt_mask = np.zeros((1, V), bool)
    prompt_mask[0, 4] = True  # prompt tokens are not penalised by these two
    got = apply_penalties(jnp.asarray(logits), slots([SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]),
                          jnp.asarray(prompt_mask), jnp.asarray(counts))
    np.testing.assert_allclose(np.asarray(got), logits - 0.25 * counts - 0.5 * (counts > 0), rtol=1e-6)


def test_draws_follow_the_filtered_distribution():
    """4000 draws (one per position) against the filtered softmax: every kept token's
    frequency within 5 binomial standard deviations, dropped tokens never drawn."""
    V, N = 12, 4000
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(V,)).astype(np.float32)
    p = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
    s = slots([p] * N, [1234] * N)
    z = np.zeros((N, V))
    out = jax.jit(sample)(jnp.tile(jnp.asarray(logits), (N, 1)), s, jnp.arange(N, dtype=jnp.int32),
                          jnp.asarray(z, bool), jnp.asarray(z, jnp.int32))
    counts = np.bincount(np.asarray(out["tokens"]), minlength=V)
    kept = hf_kept(logits, p)
    x = np.where(kept, logits / p.temperature, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    assert counts[~kept].sum() == 0
    sd = np.sqrt(N * probs * (1 - probs))
    assert np.all(np.abs(counts - N * probs) <= 5 * sd + 1), (counts, N * probs)


def test_randomness_depends_on_seed_and_position_only():
    V = 1000
    logits = jnp.zeros((4, V))
    z = jnp.zeros((4, V))
    p = SamplingParams(temperature=1.0, seed=7)
    # Same seed and position in different slots of different batches: same token.
    a = sample(logits, slots([p, p, SamplingParams(temperature=0.0), p], [7, 7, 0, 7]),
               jnp.array([5, 5, 5, 9]), z.astype(bool), z.astype(jnp.int32))["tokens"]
    assert a[0] == a[1] and a[3] != a[0]
    b = sample(logits[:1], slots([p], [7]), jnp.array([5]), z[:1].astype(bool), z[:1].astype(jnp.int32))["tokens"]
    assert b[0] == a[0]
    c = sample(logits[:1], slots([p], [8]), jnp.array([5]), z[:1].astype(bool), z[:1].astype(jnp.int32))["tokens"]
    assert c[0] != a[0]  # 1 in 1000 chance of a false failure is excluded: fixed seeds


def test_greedy_ignores_seed_and_logprobs_are_raw():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(2, 30)).astype(np.float32))
    z = jnp.zeros((2, 30))
    out = sample(logits, slots([SamplingParams(temperature=0.0)] * 2, [1, 2]), jnp.array([0, 1]),
                 z.astype(bool), z.astype(jnp.int32), num_top_logprobs=3)
    np.testing.assert_array_equal(out["tokens"], np.argmax(logits, -1))
    ref = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(out["logprob"], ref[jnp.arange(2), out["tokens"]], rtol=1e-6)
    np.testing.assert_array_equal(out["top_ids"][:, 0], out["tokens"])


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=1.1), dict(top_k=-1),
    dict(repetition_penalty=0.0), dict(presence_penalty=3.0), dict(frequency_penalty=float("nan")),
    dict(seed=-1), dict(logprobs=21),
])
def test_bad_sampling_values_name_the_field(kwargs):
    with pytest.raises(SamplingError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_sampling_mode_is_the_cheapest_exact_variant():
    greedy, temp = SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, repetition_penalty=1.2)
    assert sampling_mode([]) == sampling_mode([None, None]) == sampling_mode([greedy, None]) == "greedy"
    # A greedy row's filter settings do not matter: it is never drawn.
    assert sampling_mode([SamplingParams(temperature=0.0, top_p=0.5, top_k=3)]) == "greedy"
    assert sampling_mode([greedy, temp, None]) == "sample"
    for filtered in (dict(top_k=5), dict(top_p=0.9), dict(min_p=0.01)):
        assert sampling_mode([greedy, temp, SamplingParams(temperature=1.0, **filtered)]) == "filter"
    # Values float32 turns into "off" still count as on: "filter" is exact for any rows.
    assert sampling_mode([SamplingParams(temperature=1.0, top_p=1.0 - 1e-12)]) == "filter"
    assert sampling_mode([SamplingParams(temperature=1e-45)]) == "sample"  # 0 in float32: greedy there
    # Only some variants compiled (EngineConfig.decode_sampling_modes): the next stronger one.
    assert sampling_mode([greedy], ("filter",)) == "filter"
    assert sampling_mode([greedy, temp], ("greedy", "filter")) == "filter"
    assert sampling_mode([greedy], ("greedy", "filter")) == "greedy"
    from runtime.config import ConfigError, EngineConfig

    assert EngineConfig(decode_sampling_modes=("filter", "greedy")).decode_sampling_modes == ("greedy", "filter")
    for bad in (("greedy",), ("filter", "fast")):
        with pytest.raises(ConfigError, match="decode_sampling_modes=.* include filter"):
            EngineConfig(decode_sampling_modes=bad)


@pytest.mark.parametrize("seed", range(3))
def test_every_sampling_mode_draws_what_the_on_device_branches_draw(seed):
    """sample(mode=sampling_mode(rows)) gives the tokens of "filter" (which serves any
    rows) for random mixes of rows; "greedy" is the argmax of the penalized logits."""
    rng = np.random.default_rng(seed)
    B, V = 6, 257
    logits = jnp.asarray(rng.normal(size=(B, V)).astype(np.float32) * 3)
    prompt = jnp.asarray(rng.random((B, V)) < 0.05)
    counts = jnp.asarray(rng.integers(0, 2, (B, V)).astype(np.int32))
    pool = [None, SamplingParams(temperature=0.0, repetition_penalty=1.5),
            SamplingParams(temperature=0.8, presence_penalty=0.3), SamplingParams(temperature=1.3),
            SamplingParams(temperature=0.9, top_k=7), SamplingParams(temperature=1.1, top_p=0.7, min_p=0.02)]
    positions = jnp.asarray(rng.integers(0, 100, B).astype(np.int32))
    for _ in range(8):
        rows = [pool[i] for i in rng.integers(0, len(pool), B)]
        s = slots(rows, list(rng.integers(0, 1000, B)))
        mode = sampling_mode(rows)
        got = {m: np.asarray(sample(logits, s, positions, prompt, counts, mode=m)["tokens"]) for m in (mode, "filter")}
        np.testing.assert_array_equal(got[mode], got["filter"], err_msg=f"{mode} {rows}")
        drawn = np.array([r is not None and r.temperature > 0 for r in rows])
        assert mode != "greedy" or not drawn.any()
        if mode == "greedy":
            np.testing.assert_array_equal(got[mode], np.argmax(apply_penalties(logits, s, prompt, counts), -1))
    with pytest.raises(ValueError, match="sampling mode 'fast'"):
        sample(logits, slots([None] * B), positions, prompt, counts, mode="fast")
    assert SAMPLING_MODES == ("greedy", "sample", "filter")
