"""Incremental detokenization for streaming.

Decoding token by token goes wrong in two ways: one character can span several tokens
(SentencePiece byte-fallback pieces such as <0xE2>, byte-level BPE tokens that end inside
a UTF-8 sequence), and a piece's text can depend on its neighbours (SentencePiece drops
the leading space of the first piece). So each step decodes a short window that starts a
few tokens back (the prefix, already streamed) and emits only what the window adds past
the prefix, holding text back while it ends in an incomplete character (U+FFFD). This is
the prefix/read-offset scheme of vLLM and text-generation-inference; a step costs a
decode of the window, not of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.tokenizer import Tokenizer

# Prompt tokens kept as left context for the first generated token: enough for any
# neighbour-dependent piece, far fewer than a long prompt.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one `push` per token.

    Invariant: "".join(push(t) for t in ids) + flush() ==
    tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]
    (== tokenizer.decode(ids) without a prompt), with `skip_special_tokens` applied to
    both sides, and no delta ends in a partial character until `flush`. Ids past the
    tokenizer's vocabulary (padded embedding rows) add no text, as in `decode`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Iterable[int] = (),
        *,
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._special = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        # Ids past the tokenizer's vocabulary (a padded embedding table) have no text.
        self._vocab_size = tokenizer.vocab_size
        # Only the window is kept: ids[:read_offset] decode to self._prefix_text, which has
        # already been emitted (or belongs to the prompt); ids[read_offset:] are held back.
        self._ids: list[int] = [i for i in prompt_ids if self._has_text(i)][-_PROMPT_CONTEXT:]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    def _has_text(self, token_id: int) -> bool:
        return token_id < self._vocab_size and token_id not in self._special

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Adds one generated token; returns the newly completed text (often "")."""
        if not self._has_text(token_id):
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT):
            return ""  # nothing new, or the last character is still incomplete
        return self._advance(text)

    def flush(self) -> str:
        """Returns whatever is held back (an incomplete character becomes U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids))

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        # The tokens just emitted become the next window's prefix; older ones are dropped.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta
