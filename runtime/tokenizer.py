"""Tokenizers: SentencePiece models, Hugging Face tokenizer.json files and GGUF vocabularies.

Behaviour matches Hugging Face transformers (ids, BOS/EOS, special tokens, decoding, chat
templates), which is the reference the tests compare against. Two backends do the work:

- `_SentencePieceBackend`: a SentencePiece BPE model (tokenizer.model, or a ModelProto
  rebuilt from a GGUF "llama" vocabulary such as Gemma's).
- `_HFBackend`: a `tokenizers.Tokenizer` (tokenizer.json, or a byte-level BPE rebuilt from a
  GGUF "gpt2" vocabulary such as SmolLM2's).

`Tokenizer.save(dir)` writes standard files (tokenizer.model or tokenizer.json,
tokenizer_config.json, generation_config.json) that `Tokenizer.from_dir` reads back to the
same behaviour; checkpoint conversion uses it to carry the tokenizer along.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors

from runtime.chat_template import render_chat_template

# SentencePiece piece types; GGUF tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "\u2581"  # "▁": how SentencePiece spells a space inside pieces.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Control tokens that end a turn although the file does not call them EOS (the list
# llama.cpp uses to stop generation).
_END_OF_TURN_TOKENS = (
    "<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>",
)
# Pre-tokenizer splits for byte-level BPE vocabularies, by GGUF `tokenizer.ggml.pre`. Other
# names (gpt2, smollm, starcoder, ...) use the GPT-2 split that ByteLevel does by itself.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
_SUPPORTED_GGUF = "'llama' (SentencePiece) and 'gpt2' (byte-level BPE)"


class _AddedTokenSplitter:
    """Cuts text around added tokens (control tokens such as <start_of_turn>, user-defined
    ones such as "\\n\\n"), leftmost-longest first, the way `tokenizers` matches them."""

    def __init__(self, tokens: Mapping[str, int]):
        self._ids = {t: i for t, i in tokens.items() if t}
        # Candidate lengths by first character, longest first: a few lookups per candidate
        # position instead of trying thousands of alternatives (Gemma has ~6400 added tokens).
        lengths: dict[str, set[int]] = {}
        for t in self._ids:
            lengths.setdefault(t[0], set()).add(len(t))
        self._lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._first = re.compile("[" + "".join(map(re.escape, self._lengths)) + "]") if self._ids else None

    def split(self, text: str) -> list[str | int]:
        """Text pieces (str) and added-token ids (int), in order."""
        if self._first is None:
            return [text] if text else []
        out: list[str | int] = []
        start = pos = 0
        while (m := self._first.search(text, pos)) is not None:
            pos = m.start()
            found = next((n for n in self._lengths[text[pos]] if text[pos : pos + n] in self._ids), None)
            if found is None:
                pos += 1
                continue
            if start < pos:
                out.append(text[start:pos])
            out.append(self._ids[text[pos : pos + found]])
            start = pos = pos + found
        if start < len(text):
            out.append(text[start:])
        return out


class _SentencePieceBackend:
    """A SentencePiece model, with added tokens, BOS/EOS and decoding done as transformers'
    converted tokenizer does them (so e.g. control tokens in text encode as one id)."""

    def __init__(self, proto: sp_pb2.ModelProto, added: Mapping[int, tuple[str, bool]],
                 *, add_bos: bool, add_eos: bool, bos: str | None, eos: str | None):
        self.proto = proto
        # transformers prepends "▁" only to the text at the very start ("first" scheme, and not
        # when it already starts with a space or "▁"); SentencePiece's own add_dummy_prefix would
        # prefix every piece of text between special tokens, so it is switched off here.
        self.add_prefix_space = proto.normalizer_spec.add_dummy_prefix
        runtime = sp_pb2.ModelProto()
        runtime.CopyFrom(proto)
        runtime.normalizer_spec.add_dummy_prefix = False
        runtime.normalizer_spec.remove_extra_whitespaces = False
        try:
            self._sp = SentencePieceProcessor(model_proto=runtime.SerializeToString())
        except RuntimeError as e:  # e.g. a piece defined twice
            raise ValueError(f"invalid SentencePiece model: {e}") from e
        self.pieces = [p.piece for p in proto.pieces]
        types = [p.type for p in proto.pieces]
        self.piece_ids = {p: i for i, p in enumerate(self.pieces)}
        self._bytes = {}
        self.added = {}  # id -> (text, special): control/unknown pieces are special, user-defined ones not
        for i, (piece, ty) in enumerate(zip(self.pieces, types)):
            if ty == BYTE and (m := _BYTE_PIECE.fullmatch(piece)):
                self._bytes[i] = int(m.group(1), 16)
            elif ty in (CONTROL, UNKNOWN, USER_DEFINED):
                self.added[i] = (piece, ty != USER_DEFINED)
        self.added.update(added)
        self._added_ids = {t: i for i, (t, _) in self.added.items()}
        self._splitter = _AddedTokenSplitter(self._added_ids)
        self.vocab_size = max(len(self.pieces), max(self.added, default=-1) + 1)
        self.special_ids = frozenset(i for i, (_, special) in self.added.items() if special)
        self._bos_id = None if bos is None else self.token_to_id(bos)
        self._eos_id = None if eos is None else self.token_to_id(eos)
        self.add_bos = add_bos and self._bos_id is not None
        self.add_eos = add_eos and self._eos_id is not None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self._bos_id] if add_special_tokens and self.add_bos else []
        for k, part in enumerate(self._splitter.split(text)):
            if isinstance(part, int):
                ids.append(part)
                continue
            if k == 0 and self.add_prefix_space and not part.startswith((" ", _SPACE)):
                part = " " + part
            ids.extend(self._sp.encode(part))
        if add_special_tokens and self.add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool) -> str:
        # Mirrors the decoder chain Replace("▁", " ") -> ByteFallback -> Fuse (-> Strip one
        # leading space): consecutive byte pieces join into UTF-8, and a run that is not
        # valid UTF-8 becomes one U+FFFD per byte.
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            b = self._bytes.get(i)
            if b is not None:
                run.append(b)
                continue
            if run:
                parts.append(_utf8_or_replacement(run))
                run.clear()
            parts.append(self.id_to_token(i).replace(_SPACE, " "))
        if run:
            parts.append(_utf8_or_replacement(run))
        text = "".join(parts)
        return text[1:] if self.add_prefix_space and text.startswith(" ") else text

    def id_to_token(self, i: int) -> str:
        if i in self.added:
            return self.added[i][0]
        return self.pieces[i]

    def token_to_id(self, token: str) -> int | None:
        i = self._added_ids.get(token)
        return self.piece_ids.get(token) if i is None else i

    @property
    def transformers_class(self) -> str:
        # The transformers classes that read a tokenizer.model with these semantics.
        return "LlamaTokenizer" if self.add_prefix_space else "GemmaTokenizer"

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.model").write_bytes(self.proto.SerializeToString())
        # A tokenizer.json left from an earlier save would take precedence when loading.
        (directory / "tokenizer.json").unlink(missing_ok=True)


def _utf8_or_replacement(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)


class _HFBackend:
    """A Hugging Face `tokenizers.Tokenizer`; BOS/EOS live in its post-processor."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    transformers_class = "PreTrainedTokenizerFast"

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


def _set_bos_eos(tok: tokenizers.Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool):
    """Installs the post-processor transformers builds from add_bos_token / add_eos_token."""
    specials = []
    single = "$A:0"
    if add_bos and bos is not None and tok.token_to_id(bos) is not None:
        single = f"{bos}:0 {single}"
        specials.append((bos, tok.token_to_id(bos)))
    if add_eos and eos is not None and tok.token_to_id(eos) is not None:
        single = f"{single} {eos}:0"
        specials.append((eos, tok.token_to_id(eos)))
    pair = f"{single} {single.replace('$A:0', '$B:1').replace(':0', ':1')}"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class Tokenizer:
    """Text <-> token ids for one model, plus its special tokens and chat template.

    Build with `Tokenizer.from_dir`, `Tokenizer.from_gguf` or `load_tokenizer`.
    """

    def __init__(self, backend: _SentencePieceBackend | _HFBackend, *, tokens: Mapping[str, str | None],
                 eos_ids: Sequence[int], chat_template: str | None, config: Mapping[str, Any]):
        self._backend = backend
        self._tokens = {role: tokens.get(role) for role in _ROLES}  # role -> token text
        self._role_ids = {r: (None if t is None else backend.token_to_id(t)) for r, t in self._tokens.items()}
        eos = [self._role_ids["eos_token"], *eos_ids]
        self._eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
        self._chat_template = chat_template
        # tokenizer_config.json keys written back by save() (add_bos_token, ...).
        self._config = dict(config)

    # -- encoding -----------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens adds BOS/EOS where the model's tokenizer
        does. Special tokens written in the text (e.g. "<start_of_turn>") become single ids.
        A prompt rendered by `apply_chat_template` usually carries its own BOS: encode it
        with add_special_tokens=False."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids at or past `vocab_size` contribute no text: a model's
        embedding table is often padded beyond its tokenizer (Qwen ships 151,936 rows for
        151,665 tokens) and can sample those rows; transformers decodes them to nothing
        too. Whether an id is valid for the model is the caller's check (the model's
        vocabulary). Raises ValueError for a negative id."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token id {min(ids)} is negative")
        return self._backend.decode([i for i in ids if i < self.vocab_size], skip_special_tokens)

    # -- vocabulary ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.vocab_size

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for (bounded by its vocabulary
        entry's length: markers such as "▁", "Ġ" or "<0xE2>" stand for one character or
        less), so a text of n characters has at least n / max_token_chars tokens."""
        return max(len(self._backend.id_to_token(i) or "") for i in range(self.vocab_size))

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry for id `i` (SentencePiece spells spaces "▁", byte-level BPE "Ġ")."""
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._backend.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        """The id of vocabulary entry `token`, or None."""
        return self._backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._role_ids["bos_token"]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS first, then end-of-turn tokens."""
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._role_ids["pad_token"]

    @property
    def unk_id(self) -> int | None:
        return self._role_ids["unk_token"]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Role -> id for the roles the model defines: bos_token, eos_token, unk_token, pad_token."""
        return {r: i for r, i in self._role_ids.items() if i is not None}

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) drops (control tokens)."""
        return self._backend.special_ids

    @property
    def add_bos_token(self) -> bool:
        """Whether encode(add_special_tokens=True) starts with BOS."""
        if isinstance(self._backend, _SentencePieceBackend):
            return self._backend.add_bos
        ids = self._backend.encode("", True)
        return self.bos_id is not None and ids[:1] == [self.bos_id]

    # -- chat ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) into a prompt string.

        kwargs become template variables (tools, enable_thinking, ...). Raises ValueError
        when the model has no chat template or the template rejects the messages."""
        if not self._chat_template:
            raise ValueError(
                "this model has no chat template (none in tokenizer_config.json, chat_template.jinja "
                "or GGUF tokenizer.chat_template); it is probably a base model: encode plain text instead"
            )
        return render_chat_template(self._chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self._tokens, **kwargs)

    # -- loading and saving -------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a Hugging Face model directory: tokenizer.json (preferred) or tokenizer.model,
        with tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
        generation_config.json where present."""
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: expected a model directory holding tokenizer.json or tokenizer.model")
        config = _read_json(d / "tokenizer_config.json")
        tokens = {r: _token_text(config.get(r)) for r in _ROLES}
        special_map = _read_json(d / "special_tokens_map.json")
        for r in _ROLES:
            tokens[r] = tokens[r] or _token_text(special_map.get(r))
        added = {
            int(i): (t["content"], bool(t.get("special", False)))
            for i, t in (config.get("added_tokens_decoder") or {}).items()
        }
        flags = {k: config[k] for k in ("add_bos_token", "add_eos_token") if config.get(k) is not None}
        if (d / "tokenizer.json").is_file():
            backend = _hf_backend(tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")), added, tokens, flags)
        elif (d / "tokenizer.model").is_file():
            proto = sp_pb2.ModelProto()
            proto.ParseFromString((d / "tokenizer.model").read_bytes())
            trainer = proto.trainer_spec
            for r, i in (("bos_token", trainer.bos_id), ("eos_token", trainer.eos_id),
                         ("unk_token", trainer.unk_id), ("pad_token", trainer.pad_id)):
                if tokens[r] is None and 0 <= i < len(proto.pieces):  # the model's own roles
                    tokens[r] = proto.pieces[i].piece
            backend = _sp_backend(proto, added, tokens, flags)
        else:
            raise FileNotFoundError(f"{d}: no tokenizer.json or tokenizer.model in this directory")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if not template and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
        if not template:
            template = _read_json(d / "chat_template.json").get("chat_template")
        eos = _read_json(d / "generation_config.json").get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, tokens=tokens, eos_ids=eos_ids, chat_template=template, config=flags)

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | Any) -> Tokenizer:
        """Builds the tokenizer a GGUF file describes; `source` is a path or a gguf.GGUFReader."""
        meta = _gguf_tokenizer_metadata(source)
        name = getattr(getattr(source, "data", None), "filename", source)  # a GGUFReader's file
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise ValueError(f"{name}: the GGUF file has no tokenizer (no tokenizer.ggml.model)")
        tokens_list: list[str] = meta["tokenizer.ggml.tokens"]
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens_list))

        def role(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens_list[i] if i is not None and 0 <= i < len(tokens_list) else None

        tokens = {"bos_token": role("bos_token_id"), "eos_token": role("eos_token_id"),
                  "unk_token": role("unknown_token_id"), "pad_token": role("padding_token_id")}
        if kind == "llama":
            flags = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                     "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
            proto = _sentencepiece_proto_from_gguf(meta, tokens_list, types, tokens)
            backend = _sp_backend(proto, {}, tokens, flags)
        elif kind == "gpt2":
            flags = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
            backend = _hf_backend(_byte_level_bpe_from_gguf(meta, tokens_list, types), {}, tokens, flags)
        else:
            raise ValueError(
                f"{name}: GGUF tokenizer.ggml.model={kind!r} is not supported; supported: {_SUPPORTED_GGUF}"
            )
        eos_ids = [meta.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        eos_ids += [i for i, (t, ty) in enumerate(zip(tokens_list, types))
                    if ty == CONTROL and t in _END_OF_TURN_TOKENS]
        return cls(backend, tokens=tokens, eos_ids=[i for i in eos_ids if i is not None],
                   chat_template=meta.get("tokenizer.chat_template"), config=flags)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes tokenizer.model (replacing any tokenizer.json) or tokenizer.json,
        tokenizer_config.json, and the token ids of generation_config.json (merged into an
        existing one), so that `from_dir` (and transformers) rebuild this tokenizer."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(d)
        added = self._backend.added if isinstance(self._backend, _SentencePieceBackend) else {}
        config: dict[str, Any] = {
            **self._config,
            **{r: t for r, t in self._tokens.items() if t is not None},
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": special}
                for i, (t, special) in sorted(added.items())
            },
            "clean_up_tokenization_spaces": False,
            "tokenizer_class": self._backend.transformers_class,
        }
        if self._chat_template:
            config["chat_template"] = self._chat_template
        _write_json(d / "tokenizer_config.json", config)
        generation = _read_json(d / "generation_config.json")
        generation["eos_token_id"] = list(self._eos_ids) if len(self._eos_ids) != 1 else self._eos_ids[0]
        for r in ("bos_token", "pad_token"):
            if self._role_ids[r] is not None:
                generation[f"{r}_id"] = self._role_ids[r]
        _write_json(d / "generation_config.json", generation)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """`Tokenizer.from_dir` for a directory, `Tokenizer.from_gguf` for a .gguf file."""
    p = Path(path)
    if p.is_dir():
        return Tokenizer.from_dir(p)
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return Tokenizer.from_gguf(p)
        raise ValueError(f"{p}: not a GGUF file; pass a .gguf file or a model directory")
    raise FileNotFoundError(f"{p}: expected a model directory (tokenizer.json or tokenizer.model) or a .gguf file")


# -- building backends ------------------------------------------------------------------


def _sp_backend(proto, added, tokens, flags) -> _SentencePieceBackend:
    # transformers' SentencePiece tokenizers (Llama, Gemma) add BOS unless told not to.
    return _SentencePieceBackend(
        proto, added, add_bos=flags.get("add_bos_token", True), add_eos=flags.get("add_eos_token", False),
        bos=tokens["bos_token"], eos=tokens["eos_token"],
    )


def _hf_backend(tok: tokenizers.Tokenizer, added, tokens, flags) -> _HFBackend:
    known = tok.get_added_tokens_decoder()
    extra = [(t, special) for i, (t, special) in sorted(added.items()) if i not in known]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, s in extra if s])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, s in extra if not s])
    # Like transformers: explicit add_bos_token / add_eos_token (or no post-processor at all)
    # replace the post-processor; otherwise tokenizer.json's own one decides.
    if flags or tok.post_processor is None:
        _set_bos_eos(tok, tokens["bos_token"], tokens["eos_token"],
                     flags.get("add_bos_token", False), flags.get("add_eos_token", False))
    return _HFBackend(tok)


def _sentencepiece_proto_from_gguf(meta, tokens_list, types, tokens) -> sp_pb2.ModelProto:
    """A SentencePiece BPE ModelProto from a GGUF "llama" vocabulary.

    llama.cpp stores SentencePiece's pieces, scores and piece types as they were. Gemma
    files differ in two ways that transformers (the reference) corrects, and so do we:
    whitespace-run pieces ("  ", "   ", ...) are written with real spaces and typed
    user-defined, where they are ordinary pieces "▁▁", "▁▁▁", ... that merge like any
    other; and the file order, not the score, ranks the merges (for the Gemma 3 file the
    two agree on ordinary pieces, but the whitespace pieces carry -1000).
    Normalization only escapes spaces (identity); no dummy prefix unless
    tokenizer.ggml.add_space_prefix says so; byte fallback when byte pieces exist.
    """
    gemma = meta.get("general.architecture") in _GEMMA_ARCHITECTURES
    scores = meta.get("tokenizer.ggml.scores")
    normal = [s for s, t in zip(scores or (), types) if t == NORMAL]
    if gemma or not normal or min(normal) == max(normal):
        scores = [-float(i) for i in range(len(tokens_list))]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    if unk_id is None and "<unk>" in tokens_list:
        unk_id = tokens_list.index("<unk>")
    if unk_id is None:
        raise ValueError("GGUF SentencePiece vocabulary has no unknown token (tokenizer.ggml.unknown_token_id)")
    proto = sp_pb2.ModelProto()
    for i, (piece, score, ty) in enumerate(zip(tokens_list, scores, types)):
        if gemma and piece and piece == " " * len(piece):
            piece, ty = _SPACE * len(piece), NORMAL
        if i == unk_id:
            ty = UNKNOWN
        elif ty == UNKNOWN:
            ty = CONTROL  # SentencePiece allows a single unknown piece
        elif ty not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE):
            ty = NORMAL
        proto.pieces.add(piece=piece, score=float(score), type=ty)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens_list)
    trainer.byte_fallback = any(t == BYTE for t in types)
    trainer.unk_id = unk_id
    trainer.unk_piece = tokens_list[unk_id]
    for field, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        setattr(trainer, f"{field}_id", -1 if i is None else i)
        if tokens[f"{field}_token"] is not None:
            setattr(trainer, f"{field}_piece", tokens[f"{field}_token"])
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe_from_gguf(meta, tokens_list, types) -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF "gpt2" vocabulary and its merges,
    built as transformers builds it from the same file."""
    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {}
    for i, t in enumerate(tokens_list):
        vocab[t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))] = i
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = _BPE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    # Control tokens are special; a "control" token outside the byte alphabet is a llama.cpp
    # mislabel that would grow the vocabulary, so it is left out. User-defined tokens match
    # whole in text but are not special.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens_list, types) if ty == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens_list, types) if ty == USER_DEFINED and t in vocab])
    return tok


# -- files ------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a token as "text" or as {"content": "text", ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


# GGUF value types -> struct/numpy format (little-endian); 8 is string, 9 is array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_tokenizer_metadata(source: str | os.PathLike | Any) -> dict[str, Any]:
    """The tokenizer.* keys of a GGUF file (and general.architecture), as Python values.

    Reads the key-value section directly: gguf.GGUFReader also indexes every element of the
    262k-entry vocabulary arrays and takes seconds to open a Gemma file.
    """
    def wanted(key: str) -> bool:
        return key.startswith("tokenizer.") or key == "general.architecture"

    if hasattr(source, "fields"):  # a gguf.GGUFReader
        return {k: f.contents() for k, f in source.fields.items() if wanted(k)}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a GGUF model file")
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: not a GGUF file (only {path.stat().st_size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
        try:
            return _parse_gguf_kv(buf, wanted)
        except (struct.error, UnicodeDecodeError, IndexError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the GGUF metadata: {e}") from e


def _parse_gguf_kv(buf: mmap.mmap, wanted) -> dict[str, Any]:
    """The key-value section of a GGUF file (v2/v3, little-endian), keeping keys `wanted` accepts."""
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
    (n_kv,) = struct.unpack_from("<Q", buf, 16)
    out, off = {}, 24

    def string(off):
        (n,) = struct.unpack_from("<Q", buf, off)
        return buf[off + 8 : off + 8 + n].decode("utf-8"), off + 8 + n

    def value(off, ty):
        if ty == 8:
            return string(off)
        if ty in _GGUF_SCALARS:
            fmt = "<" + _GGUF_SCALARS[ty]
            return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
        if ty != 9:
            raise ValueError(f"unknown GGUF value type {ty}")
        item, n = struct.unpack_from("<IQ", buf, off)
        off += 12
        if item in _GGUF_SCALARS:
            dtype = np.dtype("<" + _GGUF_SCALARS[item])
            arr = np.frombuffer(buf, dtype=dtype, count=n, offset=off).tolist()
            return arr, off + n * dtype.itemsize
        items = []
        for _ in range(n):
            v, off = value(off, item)
            items.append(v)
        return items, off

    for _ in range(n_kv):
        key, off = string(off)
        (ty,) = struct.unpack_from("<I", buf, off)
        v, off = value(off + 4, ty)
        if wanted(key):
            out[key] = v
    return out
