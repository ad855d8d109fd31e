"""Chat templates: render a list of messages into the prompt text a model was trained on.

A chat template is a Jinja program shipped with the model. We render it the way transformers'
`apply_chat_template` does (same environment options, globals and `tojson`), because model
authors write and test their templates against that implementation.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from meshllm.errors import TokenizerError


class _TemplateFailed(Exception):
    """Raised by `raise_exception` inside a template, to tell its message apart from Jinja's own errors."""


def _raise_exception(message: str) -> None:
    raise _TemplateFailed(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML; transformers' does not, and templates
    # that embed tool schemas are written against transformers' output.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names as transformers does (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick for `self=`
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute cannot start with '_': {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body; transformers uses it only for training masks."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    **extra: Any,
) -> str:
    """Render `messages` with the Jinja chat `template`, as transformers' `apply_chat_template` would."""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"the chat template does not parse: {e.message} (template line {e.lineno}); "
            "fix the template, or send the prompt in raw mode"
        ) from e
    # transformers always passes tools and documents, as None when absent; templates test for them.
    context = {"tools": None, "documents": None, **extra}
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **context,
        )
    except _TemplateFailed as e:
        raise TokenizerError(f"the chat template refused these messages: {e}") from e
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
        raise TokenizerError(
            f"the chat template failed to render: {type(e).__name__}: {e}; "
            "check the messages (each needs 'role' and 'content'), or send the prompt in raw mode"
        ) from e
