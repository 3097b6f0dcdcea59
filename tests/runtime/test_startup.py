"""KV cache sizing at start-up: from the memory fraction, from --num_pages, and failing fast."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from runtime.config import EngineConfig, ModelConfig
from runtime.kv_cache import KVCache
from runtime.startup import CapacityError, activation_reserve, auto_max_num_seqs, plan_capacity

GiB = 1 << 30
CFG = ModelConfig.from_hf(dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))


class FakeDevice:
    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": 0}


def test_pages_from_memory_fraction():
    ecfg = EngineConfig(max_num_seqs=8, max_model_len=4096, kv_cache_memory_fraction=0.9, page_size=16)
    cap = plan_capacity(CFG, ecfg, param_bytes=16 * GiB, device=FakeDevice(80 * GiB))
    page_bytes = KVCache.bytes_per_token(CFG, "bfloat16") * 16
    assert cap.page_bytes == page_bytes == 2 * 32 * 8 * 128 * 2 * 16
    expect = (int(0.9 * 80 * GiB) - 16 * GiB - activation_reserve(CFG, ecfg)) // page_bytes
    assert cap.num_pages == expect
    assert cap.max_full_length_seqs == expect // 256
    assert "pages x 16 tokens" in cap.describe(4096)


def test_explicit_pages_that_do_not_fit_fail_with_the_numbers():
    ecfg = EngineConfig(max_model_len=4096, num_pages=100_000)
    with pytest.raises(CapacityError, match=r"exceed the device's 80.00 GiB; lower --num_pages"):
        plan_capacity(CFG, ecfg, param_bytes=16 * GiB, device=FakeDevice(80 * GiB))


def test_weights_that_leave_no_room_for_one_sequence_fail_fast():
    ecfg = EngineConfig(max_model_len=32768)
    with pytest.raises(CapacityError, match=r"one sequence of max_model_len=32768 needs 2048"):
        plan_capacity(CFG, ecfg, param_bytes=70 * GiB, device=FakeDevice(80 * GiB))


def test_cpu_without_memory_stats_gets_every_slot_at_full_length():
    ecfg = EngineConfig(max_num_seqs=4, max_model_len=256, page_size=16)
    assert plan_capacity(CFG, ecfg, param_bytes=GiB, device=FakeDevice(None)).num_pages == 4 * 16


def test_auto_num_seqs_follows_the_cache_within_bounds():
    ecfg = EngineConfig(max_model_len=2048)
    # 8B on an H200: ~290 sequences of 2048 fit, more slots than a decode step should carry.
    n, why = auto_max_num_seqs(CFG, ecfg, param_bytes=16 * GiB, device=FakeDevice(141 * GiB))
    assert n == 64 and "capped at 64" in why and "max_model_len=2048" in why
    # A 24 GiB card: what fits, between the bounds.
    fits = plan_capacity(CFG, EngineConfig(max_model_len=2048, max_num_seqs=64), 16 * GiB,
                         device=FakeDevice(24 * GiB)).max_full_length_seqs
    assert 8 < fits < 64
    assert auto_max_num_seqs(CFG, ecfg, 16 * GiB, device=FakeDevice(24 * GiB)) == (
        fits, f"the KV cache holds {fits} sequences of max_model_len=2048")
    # Room for 2 full-length sequences: still 8 slots (shorter ones share the cache).
    n, why = auto_max_num_seqs(CFG, EngineConfig(max_model_len=32768), 16 * GiB, device=FakeDevice(40 * GiB))
    assert n == 8 and "at least 8" in why
    # CPU: no memory limit to size from; the given value stays.
    assert auto_max_num_seqs(CFG, EngineConfig(max_num_seqs=8), GiB, device=FakeDevice(None))[0] == 8


def test_startup_clock_phases_and_summary():
    from runtime.startup import StartupClock, process_age_s

    clock = StartupClock()
    with clock.phase("weights") as detail:
        detail[0] = "1.00 GB, 2.00 GB/s"
    with clock.phase("warm-up"):
        pass
    with clock.phase("warm-up"):
        pass
    assert [name for name, _, _ in clock.phases] == ["weights", "warm-up", "warm-up"]
    assert set(clock.seconds()) == {"weights", "warm-up"}
    text = clock.summary(10.0)
    assert text.startswith("start-up: process start to loading ") and "weights 0.0 s (1.00 GB, 2.00 GB/s)" in text
    assert text.endswith("ready 10.0 s after the process started")
    assert clock.summary().startswith("start-up: weights ")
    age = process_age_s()
    assert age is None or 0 <= age < 24 * 3600


@pytest.mark.parametrize("name", ["tiny-llama", "gemma3-1b", "qwen3-8b"])
def test_abstract_model_matches_eval_shape(name):
    """abstract_model builds ShapeDtypeStructs directly (layers.shapes_only): the same
    tree, shapes, dtypes and logical axes as nnx.eval_shape of the real constructor."""
    import numpy as np
    from flax import nnx

    from runtime.models.transformer import Transformer, abstract_model
    from runtime.presets import preset_config

    cfg = preset_config(name)
    for dtype in (jnp.bfloat16, np.float32):
        new = nnx.state(abstract_model(cfg, dtype))
        old = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0))))  # noqa: B023
        is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
        a = jax.tree.leaves_with_path(new, is_leaf=is_var)
        b = jax.tree.leaves_with_path(old, is_leaf=is_var)
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            assert isinstance(x.get_value(), jax.ShapeDtypeStruct), path
            assert (x.shape, x.dtype, x.logical_axes) == (y.shape, y.dtype, y.logical_axes), path
