"""Fuzz of every Generation RPC through a real gRPC channel (issue 11, item 5).

Thousands of requests are built from the message descriptors and written on the wire
by hand (protobuf refuses to serialize invalid UTF-8, and unknown fields, duplicated
fields and broken framing need the bytes anyway): plausible requests with a few bad
values, wild ones made of boundary values (empty, huge, int64 extremes, negative, NaN
and infinities, invalid UTF-8), wire-level corruptions of both (truncation, bit flips,
unknown fields and groups, bad tags and lengths) and random bytes. They go through
channel.unary_unary / unary_stream with identity serializers, 12 at a time, to a
server over the tiny engine (with a small queue, so admission refuses some).

Every reply must be OK or a refusal the proto documents for such input (see ALLOWED)
with a short message that says something and reached the client whole; never INTERNAL
or UNKNOWN and never a hang (every call has a deadline, 30 s, 60 s for generation, and
DEADLINE_EXCEEDED fails the test). OK streams end with exactly one last response.
Afterwards the server still serves, nothing is in flight, every KV page came back and
nothing compiled. `pytest -s` prints the outcomes per RPC.

Inputs are seeded (SEED, per message index), never from the clock; outcomes of the
valid requests (admitted or RESOURCE_EXHAUSTED, NOT_FOUND or OK for Abort) depend on
timing. The regression tests at the end pin the server bugs the fuzz found.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import pathlib
import random
import re
import struct
import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from runtime import limits
from runtime.proto import generation as pb
from runtime.sampling import SamplingError, SamplingParams
from runtime.server import ServerConfig
from tests.runtime.server_harness import NUM_PAGES, serve, wait_for

Code = grpc.StatusCode

SEED = 11  # the number; every message's generator is seeded from it and its index
DEADLINE_S = 30.0
# A generation that asks for the rest of the context (127 tokens) took 15-28 s while the
# fuzz loads the server on two busy cores: twice that is still a hang.
GENERATE_DEADLINE_S = 60.0
SHORT_DEADLINE_S = 0.3  # some generations: the server sees their deadline pass mid-way
IN_FLIGHT = 12
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit (and the server's)
# Messages per RPC; the two deliberately oversize requests come on top.
COUNTS = {"Generate": 700, "GenerateUnary": 450, "Tokenize": 650, "Detokenize": 650, "GetModelInfo": 250,
          "Abort": 500}
_REFUSALS = {Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED}
# What generation.proto documents for such input on a ready server with a tokenizer.
ALLOWED = {
    "Generate": {Code.OK, Code.ALREADY_EXISTS, *_REFUSALS},
    "GenerateUnary": {Code.OK, Code.ALREADY_EXISTS, *_REFUSALS},
    "Tokenize": {Code.OK, *_REFUSALS},
    "Detokenize": {Code.OK, *_REFUSALS},
    "GetModelInfo": {Code.OK, *_REFUSALS},
    "Abort": {Code.OK, Code.NOT_FOUND, *_REFUSALS},
}
# Outcomes the fuzz causes itself (its cancel, its short deadline), kept apart in the histogram.
CLIENT_CANCELLED = "CANCELLED (by the fuzz)"
SHORT_DEADLINE_PASSED = "DEADLINE_EXCEEDED (0.3 s on purpose)"
_TOO_BIG = "Received message larger than max"  # gRPC's refusal of an oversize request
# What a client sees when the status itself was too big for it, or the handler raised.
_TRANSPORT_TROUBLE = ("Stream removed", "metadata size", "Exception calling application", "Exception iterating")
# Request ids shared by Generate, GenerateUnary and Abort, so that ids collide
# (ALREADY_EXISTS) and Abort finds requests in flight.
_ID_POOL = [f"fz-{i}" for i in range(12)]

# --- the wire format, by hand ---------------------------------------------------------

VARINT, I64, LEN, SGROUP, EGROUP, I32 = range(6)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 go as 10-byte two's complement
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _tag(number, LEN) + _varint(len(payload)) + payload


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` is gone in 7
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


_VARINT_TYPES = {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_BOOL, FD.TYPE_ENUM}

# --- values -------------------------------------------------------------------------------

_WORDS = ("the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "was", "for", "on", "are", "with",
          "they", "I", "at", "be", "this", "from", "Paris", "42", "hello", "world", ".", ",", "?", "\n")
_ODD_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n", "<s>", "</s>",
             "{{ raise_exception('boom') }}", "{% for m in messages %}", "\x00", "\ufffd", "\ufeff", "\u202e",
             "e\u0301", "\U0001F600\u200d\U0001F4BB", "Ġ", "▁", "\r\n", "\t", " ", "  ", "\\", "'\"", "%s%n")
_BAD_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xbf", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80",
             b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82",
             b"\xf0\x9f\x98", b"\xc3")
_CODEPOINTS = ((0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x370, 0x4FF), (0x590, 0x6FF),
               (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xE000, 0xF8FF),
               (0xFDD0, 0xFFFF), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF))
_STOPS = ("e", " the", ".", "\n", "<|im_end|>", "\ufffd", "ab", " ")
_ROLES = ("system", "user", "assistant", "tool", "", "USER", "function", "developer")
_DOUBLES = (math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 2.2250738585072014e-308, 1e-45, 1e-300,
            1.7976931348623157e308, -1.7976931348623157e308, 3.4028235e38, 3.5e38, -1.0, -1e-9, 0.5, 1.0,
            1 + 2**-52, 1 - 2**-53, 2.0, 2.0000000001, -2.0, -2.0000000001, 1e9, 1e-7)
_NAN_BITS = (0x7FF8000000000001, 0xFFF8000000000000, 0x7FF0000000000001, 0xFFFFFFFFFFFFFFFF)
_INT32 = (0, 1, -1, 2, 3, 4, 5, 20, 21, 127, 128, 129, 2**31 - 1, -(2**31), 2**31, 2**32 + 1, 2**63 - 1, -(2**63))
_UINT64 = (0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


class _Gen:
    """One message's worth of seeded choices. `plausible`: mostly values the server
    accepts (so requests reach the engine), each field wrong now and then; otherwise
    boundary values throughout."""

    def __init__(self, rng: random.Random, vocab: int, eos: list[int], plausible: bool):
        self.rng = rng
        self.vocab = vocab
        self.eos = eos
        self.plausible = plausible
        self.huge_left = int(rng.random() < 0.15)  # some messages may have one huge string or list
        self.room = 3_500_000  # bytes left for this message's strings and lists (stays under 4 MB)
        self.long_room = 300_000  # of which long strings (not huge ones) may take

    def take(self, n: int) -> bool:
        """Whether `n` more bytes fit in the message; if so they are spent."""
        if n > self.room:
            return False
        self.room -= n
        return True

    # -- scalars --

    def text(self, max_words: int = 30) -> str:
        r = self.rng
        words = [r.choice(_WORDS) for _ in range(r.randint(1, max_words))]
        if r.random() < 0.2:
            words.insert(r.randrange(len(words) + 1), r.choice(_ODD_TEXT))
        if r.random() < 0.2:
            words.append(self.unicode(r.randint(1, 12)))
        return " ".join(words)

    def unicode(self, n: int) -> str:
        r = self.rng
        out = []
        for _ in range(n):
            lo, hi = r.choice(_CODEPOINTS)
            c = r.randint(lo, hi)
            out.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0xFFFD))
        return "".join(out)

    def wild_string(self) -> bytes:
        r = self.rng
        x = r.random()
        if x < 0.15:
            return b""
        if x < 0.3:
            return r.choice(_ODD_TEXT).encode()
        if x < 0.5:
            return self.unicode(r.randint(1, 64)).encode()
        if x < 0.6:
            return self.text().encode()
        if x < 0.72:  # long: up to 200k characters
            value = (r.choice("ab\u00e9\u4e2d ") * r.choice((1000, 4096, 65536, 200_000))).encode()
            if len(value) > self.long_room or not self.take(len(value)):
                return b"long"
            self.long_room -= len(value)
            return value
        if x < 0.723 and self.huge_left:  # huge: 1 to 3.4 MB
            self.huge_left -= 1
            unit = r.choice(("x", "hello ", "\u4e2d", "<|im_end|>")).encode()
            value = unit * (r.randint(10, 34) * 100_000 // len(unit))
            return value if self.take(len(value)) else b"huge"
        return self.invalid_utf8()

    def invalid_utf8(self) -> bytes:
        r = self.rng
        good = self.unicode(r.randint(0, 20)).encode()
        at = r.randint(0, len(good))
        return good[:at] + r.choice(_BAD_UTF8) + good[at:]

    def string(self) -> bytes:
        if self.plausible and self.rng.random() < 0.9:
            value = self.text().encode()
        else:
            value = self.wild_string()
        return value if len(value) > 1000 or self.take(len(value)) else b""  # long ones were counted

    def double(self) -> bytes:
        r = self.rng
        if r.random() < 0.1:
            return struct.pack("<Q", r.choice(_NAN_BITS))
        v = r.choice(_DOUBLES) if r.random() < 0.7 else r.uniform(-5, 5)
        return struct.pack("<d", v)

    def token_id(self) -> int:
        r = self.rng
        if self.plausible and r.random() < 0.97:
            return r.randrange(self.vocab)
        return r.choice((0, -1, self.vocab - 1, self.vocab, self.vocab + 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1,
                         -(2**63), -(2**31), *self.eos))

    def count(self, typical: int) -> int:
        r = self.rng
        if self.plausible and r.random() < 0.95:
            return r.randint(0, typical)
        x = r.random()
        if x < 0.3:
            return 0
        if x < 0.9:
            return r.choice((1, 2, 16, 17, 33, 100, 1000))
        if self.huge_left:
            self.huge_left -= 1
            return r.choice((20_000, 100_000, 300_000))
        return 3000

    # -- fields --

    def field(self, f) -> bytes:
        """One field on the wire (all its elements when repeated)."""
        r = self.rng
        special = _SPECIAL.get(f.full_name)
        if _is_repeated(f):
            n = special(self) if special else self.count(3)
            if f.type == FD.TYPE_MESSAGE:
                out = []
                for _ in range(n):  # as many as fit
                    out.append(_len_field(f.number, self.message(f.message_type)))
                    if not self.take(len(out[-1])):
                        break
                return b"".join(out)
            if f.type == FD.TYPE_STRING:
                short = f.name == "stop" and self.plausible  # stop strings that do match now and then
                out = []
                for _ in range(n):
                    out.append(_len_field(f.number, r.choice(_STOPS).encode() if short and r.random() < 0.9
                                          else self.string()))
                    if not self.take(2):
                        break
                return b"".join(out)
            n = min(n, self.room // 11)
            self.take(11 * n)
            if f.type == FD.TYPE_INT64 and f.containing_type.name in ("TokenIds", "DetokenizeRequest",
                                                                     "SamplingParams"):
                values = [_varint(self.token_id()) for _ in range(n)]
            else:
                values = [self.scalar(f) for _ in range(n)]
            if f.type in _VARINT_TYPES and r.random() < 0.6:  # packed (proto3's default) or not
                return _len_field(f.number, b"".join(values)) if values or r.random() < 0.5 else b""
            wt = VARINT if f.type in _VARINT_TYPES else I64 if f.type == FD.TYPE_DOUBLE else I32
            return b"".join(_tag(f.number, wt) + v for v in values)
        if f.type == FD.TYPE_MESSAGE:
            return _len_field(f.number, self.message(f.message_type))
        if f.type == FD.TYPE_STRING:
            value = special(self) if special else self.string()
            return _len_field(f.number, value)
        if special is not None and (self.plausible and r.random() < 0.85):
            value = special(self)
            return _tag(f.number, I64) + struct.pack("<d", value) if f.type == FD.TYPE_DOUBLE else (
                _tag(f.number, VARINT) + _varint(value))
        wt = VARINT if f.type in _VARINT_TYPES else I64 if f.type == FD.TYPE_DOUBLE else I32
        return _tag(f.number, wt) + self.scalar(f)

    def scalar(self, f) -> bytes:
        r = self.rng
        if f.type == FD.TYPE_DOUBLE:
            return self.double()
        if f.type == FD.TYPE_FLOAT:
            return struct.pack("<f", r.choice((math.nan, math.inf, 0.0, 1.0)))
        if f.type == FD.TYPE_BOOL:
            return _varint(r.choice((0, 1, 1, 0, 2, 2**64 - 1)))
        if f.type in (FD.TYPE_UINT64, FD.TYPE_UINT32):
            return _varint(r.choice(_UINT64))
        if f.type == FD.TYPE_INT64:
            return _varint(self.token_id())
        return _varint(r.choice(_INT32) if r.random() < 0.8 else r.randint(-1000, 1000))

    def message(self, desc) -> bytes:
        r = self.rng
        parts = []
        oneofs = [o for o in desc.oneofs if len(o.fields) > 1]  # proto3 `optional` makes 1-field oneofs
        in_oneof = {f.name for o in oneofs for f in o.fields}
        for o in oneofs:
            k = (1 if r.random() < 0.95 else 0) if self.plausible else r.choice((0, 1, 1, 1, 2))
            for f in r.sample(list(o.fields), k):  # two members: the last one wins
                parts.append(self.field(f))
        for f in desc.fields:
            if f.name in in_oneof:
                continue
            if r.random() < _PRESENCE.get(f.full_name, 0.5 if self.plausible else 0.6):
                parts.append(self.field(f))
        if not self.plausible and r.random() < 0.3:
            r.shuffle(parts)
        if r.random() < 0.08:  # a field twice: scalars take the last value, messages merge
            parts.append(r.choice(parts) if parts else b"")
        if r.random() < 0.1:
            parts.append(self.unknown_fields())
        return b"".join(parts)

    def unknown_fields(self) -> bytes:
        r = self.rng
        out = []
        for _ in range(r.randint(1, 4)):
            number = r.choice((14, 15, 99, 1000, 18999, 20000, 2**29 - 1))
            wt = r.choice((VARINT, I64, LEN, I32, SGROUP))
            if wt == VARINT:
                out.append(_tag(number, wt) + _varint(r.choice(_UINT64)))
            elif wt == I64:
                out.append(_tag(number, wt) + r.randbytes(8))
            elif wt == I32:
                out.append(_tag(number, wt) + r.randbytes(4))
            elif wt == LEN:
                out.append(_len_field(number, r.randbytes(r.randint(0, 64))))
            else:  # a group, nested a little: parses as unknown fields
                depth = r.randint(1, 20)
                out.append(_tag(number, SGROUP) * depth + _tag(number, EGROUP) * depth)
        return b"".join(out)


def _max_tokens(g: _Gen) -> int:
    r = g.rng
    if r.random() < 0.92:
        return r.randint(1, 6)
    return r.choice((8, 16, 0, -1, 127, 128, 2**31 - 1))


def _temperature(g: _Gen) -> float:
    return g.rng.choice((0.0, 0.0, 0.7, 1.0, 1.3))


_SPECIAL = {  # full field name -> plausible value (strings: bytes; repeated: how many)
    "xlserve.v1.GenerateRequest.request_id": lambda g: (
        b"" if g.rng.random() < 0.6 else g.rng.choice(_ID_POOL).encode() if g.rng.random() < 0.8
        else g.wild_string()),
    "xlserve.v1.AbortRequest.request_id": lambda g: (
        g.rng.choice(_ID_POOL).encode() if g.rng.random() < 0.7 else g.wild_string()),
    "xlserve.v1.ChatMessage.role": lambda g: (
        g.rng.choice(_ROLES).encode() if g.plausible or g.rng.random() < 0.5 else g.wild_string()),
    "xlserve.v1.Chat.messages": lambda g: g.count(3) or (1 if g.plausible else 0),
    "xlserve.v1.TokenIds.ids": lambda g: g.count(60) or (1 if g.plausible else 0),
    "xlserve.v1.DetokenizeRequest.token_ids": lambda g: g.count(200),
    "xlserve.v1.SamplingParams.stop": lambda g: g.count(2),
    "xlserve.v1.SamplingParams.stop_token_ids": lambda g: g.count(3),
    "xlserve.v1.SamplingParams.max_tokens": _max_tokens,
    "xlserve.v1.SamplingParams.temperature": _temperature,
    "xlserve.v1.SamplingParams.top_k": lambda g: g.rng.choice((0, 1, 5, 50)),
    "xlserve.v1.SamplingParams.top_p": lambda g: g.rng.choice((1.0, 0.9, 0.5)),
    "xlserve.v1.SamplingParams.min_p": lambda g: g.rng.choice((0.0, 0.05, 0.5)),
    "xlserve.v1.SamplingParams.repetition_penalty": lambda g: g.rng.choice((1.0, 1.1, 1.5, 0.8)),
    "xlserve.v1.SamplingParams.presence_penalty": lambda g: g.rng.choice((0.0, 0.5, -0.5, 2.0)),
    "xlserve.v1.SamplingParams.frequency_penalty": lambda g: g.rng.choice((0.0, 0.3, -2.0)),
    "xlserve.v1.SamplingParams.seed": lambda g: g.rng.randrange(2**63),
    "xlserve.v1.SamplingParams.logprobs": lambda g: g.rng.choice((0, 1, 2, 3)),
}
# How often a field is present in a plausible message (else 0.5). Top-k/top-p/min-p
# sort the vocabulary of the whole batch on CPU: rarer.
_PRESENCE = {
    # Unset max_tokens asks for the rest of the context: ~100 tokens, at 5-10 tokens/s
    # per stream on a busy CPU. About 1 valid request in 50.
    "xlserve.v1.GenerateRequest.sampling": 0.99,
    "xlserve.v1.SamplingParams.max_tokens": 0.99,
    "xlserve.v1.SamplingParams.top_k": 0.1,
    "xlserve.v1.SamplingParams.top_p": 0.1,
    "xlserve.v1.SamplingParams.min_p": 0.1,
    "xlserve.v1.SamplingParams.logprobs": 0.2,
    "xlserve.v1.SamplingParams.stop": 0.2,
    "xlserve.v1.SamplingParams.stop_token_ids": 0.2,
    "xlserve.v1.ChatMessage.role": 0.95,
    "xlserve.v1.ChatMessage.content": 0.95,
    "xlserve.v1.Chat.messages": 0.95,
    "xlserve.v1.TokenIds.ids": 0.97,
}


def _corrupt(rng: random.Random, raw: bytes) -> bytes:
    """Wire-level damage to a message: most of these no longer parse."""
    how = rng.randrange(9)
    if how == 0 and raw:  # truncated
        return raw[: rng.randrange(len(raw))]
    if how == 1 and raw:  # bit flips
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if how == 2:  # random bytes spliced in
        at = rng.randint(0, len(raw))
        return raw[:at] + rng.randbytes(rng.randint(1, 16)) + raw[at:]
    if how == 3:  # field number 0, or wire types 6 and 7
        return raw + rng.choice((b"\x00\x01", _varint(1 << 3 | 6), _varint(2 << 3 | 7) + b"\x01"))
    if how == 4:  # an 11-byte varint
        return raw + b"\x08" + b"\xff" * 10 + b"\x01"
    if how == 5:  # a length past the end (or past 2**32)
        return raw + _tag(rng.choice((1, 2, 3, 5)), LEN) + _varint(rng.choice((10, 2**31, 2**32 + 3))) + b"abc"
    if how == 6:  # an unterminated or unmatched group, or nesting past the parser's limit
        return raw + rng.choice((_tag(20, SGROUP), _tag(20, EGROUP), _tag(20, SGROUP) * 200 + _tag(20, EGROUP) * 200))
    if how == 7:  # a string field of a sub-message with invalid UTF-8 in the middle of a valid message
        return raw + _len_field(1, rng.choice(_BAD_UTF8))
    return rng.randbytes(rng.choice((1, 2, 8, 64, 512, 4096)))  # not a message at all


def build_case(rpc: str, index: int, vocab: int, eos: list[int]) -> tuple[bytes, str]:
    """The index-th fuzz message of `rpc` (seeded by SEED, rpc and index): (bytes, kind)."""
    rng = random.Random(f"{SEED}:{rpc}:{index}")
    desc = pb.METHODS[rpc][0].DESCRIPTOR
    x = rng.random()
    kind = "plausible" if x < 0.55 else "wild" if x < 0.85 else "corrupt"
    for _ in range(10):
        g = _Gen(rng, vocab, eos, plausible=kind == "plausible" or (kind == "corrupt" and rng.random() < 0.5))
        raw = g.message(desc)
        if kind == "corrupt":
            raw = _corrupt(rng, raw)
        if len(raw) < MAX_REQUEST_BYTES - 1024:  # oversize ones are sent on purpose, below
            return raw, kind
    raise AssertionError(f"could not build a message under 4 MB for {rpc} #{index}")


def oversize_cases() -> list[tuple[str, bytes, str]]:
    text = _len_field(2, b"x" * (MAX_REQUEST_BYTES + 1000))  # GenerateRequest.text
    ids = _len_field(1, b"\x05" * (MAX_REQUEST_BYTES + 10))  # DetokenizeRequest.token_ids, packed
    return [("Generate", text, "oversize"), ("Detokenize", ids, "oversize")]


# --- sending ------------------------------------------------------------------------------


def _check_generation(parts: list, vocab: int) -> tuple[str | None, str]:
    """(a broken invariant or None, a note) of an OK generation's responses."""
    last = parts[-1]
    if [bool(r.finish_reason) for r in parts] != [False] * (len(parts) - 1) + [True]:
        return f"{sum(bool(r.finish_reason) for r in parts)} last responses in {len(parts)}", ""
    ids = [i for r in parts for i in r.token_ids]
    logprobs = sum(len(r.logprobs) for r in parts)
    top = sum(len(r.top_logprobs) for r in parts)
    note = f"{len(ids)} tokens, server e2e {last.timings.e2e_s:.1f} s"
    if last.usage.completion_tokens != len(ids):
        return f"usage says {last.usage.completion_tokens} tokens, the responses carry {len(ids)}", note
    if not all(0 <= i < vocab for i in ids):
        return f"token ids outside [0, {vocab})", note
    if logprobs not in (0, len(ids)) or top not in (0, len(ids)):
        return f"{logprobs} logprobs and {top} top logprobs for {len(ids)} tokens", note
    if len({r.request_id for r in parts}) != 1 or not last.request_id:
        return "responses with different or no request ids", note
    return None, note


async def _send(channel, rpc: str, raw: bytes, cancel: bool, deadline: float,
                vocab: int) -> tuple[str, str, str | None, str]:
    """(status, details, a broken invariant or None, a note on a generation) of one call."""
    _, resp_cls, streaming = pb.METHODS[rpc]
    path = pb.method_path(rpc)
    if streaming:
        call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)(raw, timeout=deadline)
        parts = []
        try:
            async for data in call:
                parts.append(resp_cls.FromString(data))
                if cancel:
                    call.cancel()
                    break
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details() or "", None, ""
        code = await call.code()
        if cancel and code == Code.CANCELLED:
            return CLIENT_CANCELLED, "", None, ""  # only a call the fuzz cancelled reads so
        if code != Code.OK:
            return code.name, await call.details() or "", None, ""
        return (code.name, "", *_check_generation(parts, vocab)) if parts else (code.name, "", "no responses", "")
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        data = await call(raw, timeout=deadline)
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or "", None, ""
    r = resp_cls.FromString(data)
    if rpc == "GenerateUnary":
        return (Code.OK.name, "", *_check_generation([r], vocab))
    if rpc == "Tokenize" and len(r.tokens) != len(r.token_ids):
        return Code.OK.name, "", f"{len(r.token_ids)} ids but {len(r.tokens)} tokens", ""
    return Code.OK.name, "", None, ""


@dataclasses.dataclass
class _Case:
    rpc: str
    index: int  # -1: `raw` is given
    cancel: bool  # a Generate stream the fuzz cancels after its first response
    deadline: float  # seconds; a short one on purpose for some generations
    kind: str = ""
    raw: bytes = b""  # built when sent (the whole set would take ~100 MB)
    size: int = 0
    status: str = ""
    details: str = ""
    problem: str | None = None
    seconds: float = 0.0
    note: str = ""


async def _run_all(target: str, cases: list[_Case], vocab: int, eos: list[int]) -> None:
    # No receive limit on the client: what comes back is the server's verdict, whatever its size.
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(case: _Case):
            async with gate:
                raw = case.raw
                if case.index >= 0:
                    raw, case.kind = build_case(case.rpc, case.index, vocab, eos)
                case.size, case.raw = len(raw), raw[:48]
                t0 = time.monotonic()
                try:
                    case.status, case.details, case.problem, case.note = await _send(
                        channel, case.rpc, raw, case.cancel, case.deadline, vocab)
                except Exception as e:  # noqa: BLE001 -- a response that does not parse, say
                    case.status, case.details, case.problem = "CLIENT_ERROR", repr(e), repr(e)
                case.seconds = time.monotonic() - t0

        await asyncio.gather(*(one(c) for c in cases))


# --- the test -----------------------------------------------------------------------------


def test_fuzz_every_rpc(engine, tokenizer):
    vocab, eos = tokenizer.vocab_size, list(tokenizer.eos_ids)
    order = random.Random(f"{SEED}:order")
    cases = []
    for rpc, n in COUNTS.items():
        for i in range(n):
            x = order.random()
            generate = rpc in ("Generate", "GenerateUnary")
            cases.append(_Case(rpc, i, cancel=rpc == "Generate" and x < 0.1,
                               deadline=SHORT_DEADLINE_S if generate and x > 0.97 else
                               GENERATE_DEADLINE_S if generate else DEADLINE_S))
    cases += [_Case(rpc, -1, False, DEADLINE_S, kind, raw) for rpc, raw, kind in oversize_cases()]
    order.shuffle(cases)
    # A short queue and a small token budget: bursts of valid requests are refused
    # (RESOURCE_EXHAUSTED).
    config = ServerConfig(model_name="tiny", max_queue=4, max_pending_tokens=800)
    with serve(engine, tokenizer, config) as h:
        t0 = time.monotonic()
        asyncio.run(_run_all(h.target, cases, vocab, eos))
        elapsed = time.monotonic() - t0

        histogram: dict[str, collections.Counter] = {rpc: collections.Counter() for rpc in pb.METHODS}
        failures = []
        for c in cases:
            if c.deadline == SHORT_DEADLINE_S and c.status == Code.DEADLINE_EXCEEDED.name:
                c.status = SHORT_DEADLINE_PASSED
            histogram[c.rpc][c.status] += 1
            allowed = {code.name for code in ALLOWED[c.rpc]} | {CLIENT_CANCELLED, SHORT_DEADLINE_PASSED}
            why = c.problem
            if c.status not in allowed:
                why = f"status {c.status} is not allowed for {c.rpc}"
            elif c.status not in (Code.OK.name, CLIENT_CANCELLED, SHORT_DEADLINE_PASSED) and not c.details.strip():
                why = f"{c.status} without a message"
            elif (c.kind == "oversize") != (c.status == Code.RESOURCE_EXHAUSTED.name and _TOO_BIG in c.details):
                why = f"{c.kind} request got {c.status}"
            elif c.status != SHORT_DEADLINE_PASSED and any(s in c.details for s in _TRANSPORT_TROUBLE):
                why = "the server's status did not reach the client"
            elif len(c.details.encode()) > 2048:
                why = f"a {len(c.details.encode())}-byte status message"
            if why:
                failures.append(f"{c.rpc} #{c.index} ({c.kind}, {c.size} bytes, {c.raw!r}, {c.seconds:.1f} s): "
                                f"{why}: {c.details[:300]}")

        print(f"\nfuzz: {len(cases)} messages in {elapsed:.1f} s, {IN_FLIGHT} in flight")
        for rpc, counts in histogram.items():
            print(f"  {rpc:<14} {sum(counts.values()):>5}  " + "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        slowest = sorted(cases, key=lambda c: -c.seconds)[:3]
        print("  slowest: " + "; ".join(f"{c.rpc} #{c.index} {c.seconds:.1f} s ({c.status} {c.note})" for c in slowest))
        for line in failures[:40]:
            print("  BAD", line)

        # Nothing leaked: in flight, pages, slots (serve() checks the slots on exit).
        assert h.client.health(pb.SERVICE_NAME) == "SERVING"
        wait_for(lambda: h.info().load.num_in_flight == 0 and h.info().load.num_pages_used == 0, timeout=10.0)
        load = h.info().load
        print(f"  after: in flight {load.num_in_flight}, pages used {load.num_pages_used}/{NUM_PAGES}, "
              f"preemptions {load.num_preemptions}, compiles since ready {load.num_compiles_since_ready}")
        assert load.num_pages_free == NUM_PAGES and load.num_running == 0 and load.num_waiting == 0
        assert load.num_pending_tokens == 0
        # Every shape the fuzz can produce is in the warmed manifest.
        assert load.num_compiles_since_ready == 0
        assert h.server.metrics.registry.get_sample_value("xlserve_requests_failed_total") in (None, 0.0)

    assert not failures, f"{len(failures)} bad replies:\n" + "\n".join(failures[:40])
    assert len(cases) >= 3000
    for rpc, counts in histogram.items():
        assert counts[Code.OK.name] > 0, (rpc, counts)  # the fuzz reached the real work...
        assert counts[Code.INVALID_ARGUMENT.name] > 0, (rpc, counts)  # ...and the refusals
    assert histogram["Generate"][Code.OK.name] + histogram["GenerateUnary"][Code.OK.name] >= 50
    full = Code.RESOURCE_EXHAUSTED.name
    assert histogram["Generate"][full] + histogram["GenerateUnary"][full] > 1  # beyond the oversize one
    assert histogram["Abort"][Code.NOT_FOUND.name] > 0


# --- regressions: the server bugs the fuzz found ----------------------------------------------


def test_abort_of_a_long_request_id_gets_a_short_status(engine, tokenizer):
    """NOT_FOUND used to echo the whole id: a status bigger than the client's metadata
    limit, which the client saw as RESOURCE_EXHAUSTED "Stream removed"."""
    with serve(engine, tokenizer) as h:
        abort = h.client.channel.unary_unary(pb.method_path("Abort"), request_serializer=None,
                                             response_deserializer=None)
        for n, code in ((256, Code.NOT_FOUND), (257, Code.INVALID_ARGUMENT), (100_000, Code.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                abort(_len_field(1, "\u4e2d".encode() * n), timeout=DEADLINE_S)
            assert e.value.code() == code, (n, e.value.details()[:200])
            assert len(e.value.details()) < 1024
        assert f"request_id has 100000 characters; at most {limits.MAX_REQUEST_ID_CHARS}" in e.value.details()


def test_sampling_values_float32_cannot_hold_are_refused(engine, tokenizer):
    """They became inf or 0 in the engine's float32 rows: an inf repetition penalty
    times a 0 logit is NaN, which greedy argmax picks."""
    for kw, want in (
        (dict(temperature=1e39), "temperature=1e+39 is out of range; use a value in [0, 3.4e38]"),
        (dict(repetition_penalty=1e39), "repetition_penalty=1e+39 is out of range; use a value in [1.2e-38, 3.4e38]"),
        (dict(repetition_penalty=1e-46), "repetition_penalty=1e-46 is out of range"),
        (dict(top_p=1e-46), "top_p=1e-46 is out of range; use a value in [1.2e-38, 1]"),
    ):
        with pytest.raises(SamplingError, match=re.escape(want)):
            SamplingParams(**kw)
    SamplingParams(temperature=3.4e38, repetition_penalty=1.2e-38, top_p=1.2e-38)  # the bounds themselves
    with serve(engine, tokenizer) as h:
        with pytest.raises(grpc.RpcError) as e:
            h.client.generate_unary("hi", max_tokens=2, repetition_penalty=1e39, temperature=0.0, timeout=DEADLINE_S)
        assert e.value.code() == Code.INVALID_ARGUMENT and "repetition_penalty=1e+39" in e.value.details()


_PURE_PYTHON_PARSE = r"""
import asyncio
from google.protobuf.internal import api_implementation
assert api_implementation.Type() == "python", api_implementation.Type()
import grpc
from runtime.proto import generation as pb
from runtime.server import GenerationServer
from tests.runtime.test_fuzz import build_case, _len_field

class Refused(Exception):
    pass

class Context:
    async def abort(self, code, details):
        raise Refused(code, details)

async def main():
    server = GenerationServer(lambda: None)
    bad = b"ok\xed\xa0\x80"  # a UTF-16 surrogate, encoded
    utf8 = [(pb.GenerateRequest, _len_field(1, bad)), (pb.GenerateRequest, _len_field(2, bad)),
            (pb.GenerateRequest, _len_field(3, _len_field(1, _len_field(2, bad)))),  # chat content
            (pb.TokenizeRequest, _len_field(1, bad)), (pb.AbortRequest, _len_field(1, bad))]
    for cls, raw in utf8:
        try:
            await server._parse(raw, cls, Context())
            raise AssertionError(f"{cls.__name__} parsed invalid UTF-8")
        except Refused as r:
            code, details = r.args
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not valid UTF-8" in details, details
    n = 0
    for name, (cls, _, _) in pb.METHODS.items():
        for i in range(120):
            raw, _ = build_case(name, i, 49152, [2])
            try:
                await server._parse(raw, cls, Context())
            except Refused as r:
                assert r.args[0] == grpc.StatusCode.INVALID_ARGUMENT, r.args
                n += 1
    print("refused", n)

asyncio.run(main())
"""


def test_invalid_utf8_is_invalid_argument_on_the_pure_python_protobuf_runtime():
    """protobuf's pure-Python runtime raises UnicodeDecodeError, not DecodeError, for
    invalid UTF-8: the handlers let it through and the client got UNKNOWN."""
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "PYTHONPATH": str(root),
           "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", _PURE_PYTHON_PARSE], capture_output=True, text=True, cwd=root,
                       env=env, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert int(p.stdout.split()[-1]) > 100  # the fuzz's malformed messages were refused, not raised
