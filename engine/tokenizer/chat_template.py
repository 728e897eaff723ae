"""Chat templates rendered with jinja2 (sandboxed) the way transformers renders them."""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError


def render_chat_template(source: str | None, messages: list[dict], add_generation_prompt: bool,
                         special: Mapping[str, str], path: str | None,
                         field: str = "tokenizer.chat_template") -> str:
    """Render a chat template (jinja2, sandboxed, compiled once per source) the way transformers does;
    `special` holds bos_token/eos_token texts. Errors name `field` of `path`."""
    if source is None:
        raise TokenizerError("the model has no chat template", path=path, field=field)
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"expected a list of messages, got {type(messages).__name__}", path=path,
                             field="messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise TokenizerError("each message must be a mapping with a string 'role'", path=path,
                                 field=f"messages[{i}]")
    try:
        template = _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not compile: {e}", path=path, field=field) from None
    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               **special)
    except _TemplateRaised as e:
        raise TokenizerError(f"chat template rejected the messages: {e}", path=path, field="messages") from None
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}", path=path, field=field) from None


@functools.lru_cache(maxsize=8)
def _compiled(source: str) -> jinja2.Template:
    return _template_env().from_string(source)


class _TemplateRaised(Exception):
    """raise_exception() called from inside a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_env() -> ImmutableSandboxedEnvironment:
    """A sandboxed environment configured like transformers' chat-template renderer."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
