"""Chat messages -> prompt text with the model's own chat template (jinja2, as transformers renders it).

The template comes from ``chat_template.jinja`` or tokenizer_config.json's ``chat_template`` (a string,
or a list of named templates of which "default" is used). Without one, a plain "role: content" layout
is used. Templates run in jinja2's sandbox: a checkpoint's template is untrusted code.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from meshserve.errors import InputError, require, text

ROLES = ("system", "user", "assistant", "tool", "developer")


def read_chat_template(model_dir: Path) -> str | None:
    """The model's chat template text, or None when it has none."""
    file = model_dir / "chat_template.jinja"
    if file.is_file():
        return file.read_text()
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as role / content string pairs; text parts of a content list are joined."""
    require(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        require(isinstance(message, dict), f"messages[{i}]", "must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        require(role in ROLES, f"messages[{i}].role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: only text is supported
            require(
                all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in content
                ),
                f"messages[{i}].content",
                "only text parts are supported",
            )
            content = "".join(p["text"] for p in content)
        require(
            isinstance(content, str), f"messages[{i}].content", "must be a string or a list of text parts"
        )
        out.append({"role": role, "content": text(content, f"messages[{i}].content")})
    return out


def render_chat(
    messages: list[dict[str, str]],
    template: str | None,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Prompt text for ``messages`` (checked with check_messages first)."""
    if template is None:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + ("\nassistant:" if add_generation_prompt else "")
    try:
        return _compile(template).render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except InputError:
        raise
    except Exception as err:  # a template error is about the messages or the template, never fatal
        raise InputError("messages", f"the model's chat template failed: {err}") from None


def _raise(message: str) -> None:
    raise InputError("messages", message)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)
