"""transformers generate with a static cache on the same shapes (the peer in runtime.bench).

Run as a subprocess by runtime.bench, before JAX takes the GPU; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time


def run(hf_config: dict, batch_sizes: list[int], prompt_len: int, gen_len: int, dtype: str) -> list[dict]:
    import torch
    import transformers

    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[hf_config["model_type"]]
    config_cls = transformers.AutoConfig.for_model(hf_config["model_type"]).__class__
    config = config_cls(**{k: v for k, v in hf_config.items() if k != "model_type"})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = getattr(transformers, cls)._from_config(config, dtype=torch_dtype).eval()
    results = []
    for batch in batch_sizes:
        ids = torch.randint(1, min(1000, config.vocab_size), (batch, prompt_len), device=device)
        kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None,
                      attention_mask=torch.ones_like(ids))

        def timed(n):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            assert out.shape[1] == prompt_len + n
            return time.perf_counter() - t

        timed(gen_len)  # warm-up: static cache allocation, compilation
        t_first = min(timed(1) for _ in range(2))
        t_all = min(timed(gen_len) for _ in range(2))
        decode_s = max(t_all - t_first, 1e-9)
        results.append(dict(batch=batch, ttft_s=t_first, decode_tok_s_per_seq=(gen_len - 1) / decode_s,
                            decode_tok_s=batch * (gen_len - 1) / decode_s))
    return results


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(run(**args)))
