"""Chat templates: the Jinja programs that turn a message list into a prompt string.

Templates come from model repositories (tokenizer_config.json, chat_template.jinja, GGUF
`tokenizer.chat_template`) and are untrusted code, so they run in Jinja's immutable
sandbox over plain JSON data. The environment matches the one Hugging Face transformers
renders with (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a non-escaping `tojson`), so a template renders to the same string here
as it does there.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it
    only renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, which are a route to Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 -- same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which changes prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


class ChatTemplateError(RuntimeError):
    """The model's chat template itself is broken (a syntax error, or it fails with an
    error of its own while rendering): the server's fault, not the messages'."""


@functools.lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compiles `template` once; raises ChatTemplateError on a Jinja syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from e


def _plain(value: Any, where: str) -> Any:
    """A copy of `value` made only of JSON types, so the sandbox sees no foreign objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    for scalar in (bool, int, float, str):  # subclasses of the JSON scalars
        if isinstance(value, scalar):
            return scalar(value)
    raise ValueError(f"{where} has type {type(value).__name__}; chat messages must be JSON data")


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str | None],
    **kwargs: Any,
) -> str:
    """Renders `messages` (each a dict with at least "role") with `template`.

    special_tokens: template variables such as bos_token / eos_token.
    kwargs: further template variables (tools, documents, enable_thinking, ...).
    Raises ValueError for malformed messages or when the template rejects them
    (raise_exception, an undefined field, the sandbox), ChatTemplateError when the
    template itself is broken.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a 'role' key, got {m!r}")
    # transformers always defines tools and documents (None when absent); templates test them.
    variables = {"tools": None, "documents": None, **special_tokens}
    variables.update(_plain(dict(kwargs), "kwargs"))
    variables["messages"] = _plain(list(messages), "messages")
    variables["add_generation_prompt"] = add_generation_prompt
    try:
        return compile_chat_template(template).render(**variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template rejected the messages: {e}") from e
    except Exception as e:  # noqa: BLE001 -- anything else is the template's own failure
        raise ChatTemplateError(f"the chat template failed while rendering: {e!r}") from e
