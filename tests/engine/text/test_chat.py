"""test_chat.py — the engine's native Gemma 3 chat template against the Hub's Jinja template
(transformers' convert_gemma3_weights.py _CHAT_TEMPLATE, verbatim) rendered by python3-jinja2
the way transformers renders it."""
import json

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import os as _os
import sys as _sys

_sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), ".."))  # enginetool.py
from enginetool import run  # noqa: E402

TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


class TemplateError(Exception):
    pass


def raise_exception(msg):
    raise TemplateError(msg)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
env.globals["raise_exception"] = raise_exception
tmpl = env.from_string(TEMPLATE)


def jinja(messages, gen):
    return tmpl.render(messages=messages, add_generation_prompt=gen, bos_token="<bos>")


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


CASES = {
    "one user turn": [u("Hi")],
    "multi-turn": [u("Hi"), a("Hello! How can I help?"), u("Write a haiku.")],
    "system + multi-turn": [{"role": "system", "content": "You are terse."}, u("Hi"), a("Yo"), u("Again")],
    "system kept verbatim": [{"role": "system", "content": "  spaced system\n"}, u("  padded user  ")],
    "reference example": [{"role": "system", "content": "S"}, u("Hi"), a("Yo")],
    "role model spelled model": [u("q"), {"role": "model", "content": "a"}, u("q2")],
    "trim newlines and tabs": [u("\n\tline one\n  line two\t\n\n")],
    "trim unicode spaces": [u("\u00a0\u3000wide\u2003 \u2009"), a("\u200a ok \u2028")],
    "inner whitespace kept": [u("a  b\n\nc")],
    "utf-8 content": [u("héllo 世界 🙂"), a("ça va 👍")],
    "empty content": [u(""), a("   ")],
    "long history": [u(f"turn {i}") if i % 2 == 0 else a(f"reply {i}") for i in range(9)],
}


@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("name", list(CASES))
def test_render_matches_jinja(name, gen):
    msgs = CASES[name]
    want = jinja(msgs, gen)
    got = run("chat", "gen" if gen else "nogen", stdin=json.dumps(msgs).encode()).stdout.decode()
    assert got == want


@pytest.mark.parametrize("msgs", [
    [u("a"), u("b")],
    [a("first")],
    [{"role": "system", "content": "s"}, a("x")],
    [u("a"), a("b"), a("c")],
], ids=["user-user", "assistant-first", "system-then-assistant", "assistant-assistant"])
def test_alternation_error_like_jinja(msgs):
    with pytest.raises(TemplateError):
        jinja(msgs, True)
    p = run("chat", "gen", stdin=json.dumps(msgs).encode(), check=False)
    assert p.returncode == 2
    assert b"Conversation roles must alternate" in p.stderr


def test_no_messages_is_an_error_in_both():
    with pytest.raises(jinja2.exceptions.UndefinedError):
        jinja([], True)
    p = run("chat", "gen", stdin=b"[]", check=False)
    assert p.returncode == 2
    assert b"no messages" in p.stderr
