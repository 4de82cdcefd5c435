"""The chat templates as Jinja for Hugging Face's `apply_chat_template`: what an exported model's
tokenizer_config.json (and a GGUF file) carries, rendering exactly lmlab.data.chat's `render_text`
(tests/test_chat.py and tests/test_chat_thinking.py compare the token ids for every template).

    from lmlab.data.chat_jinja import hf_chat_template
    jinja = hf_chat_template("chatml", tokenizer)

Message text is escaped as lmlab escapes it (`esc`: every special token's string broken by
TEXT_BREAK after its first character), so a message cannot write a control token here either.
"""

from __future__ import annotations

from lmlab.data.chat import (ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT, DEFAULT_SYSTEM, SMOLLM3_CUTOFF,
                             SMOLLM3_DATE_FORMAT, SMOLLM3_SYSTEM_NO_THINK, SMOLLM3_SYSTEM_THINK, _check_name,
                             control_tokens)
from lmlab.data.tokenizer import TEXT_BREAK


_HF_CHATML = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + esc(message['role']) + '\\n' + esc(message['content']) }}"
    "{% if message['role'] == 'user' and message['input'] is defined and message['input'] %}"
    "{{ '\\n\\n' + esc(message['input']) }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# `think`: chatml whose assistant messages may carry "thinking"; `enable_thinking=False` (as
# Qwen3's template takes it) ends a generation prompt with an empty thinking block, and gives the
# conversation's last reply (no generation prompt after it), when it has no thinking, that empty
# block too (chat.render(..., thinking=False)).
_HF_THINK = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + esc(message['role']) + '\\n' }}"
    "{% if message['role'] == 'assistant' and message['thinking'] is defined and message['thinking'] is not none %}"
    "{{ '<think>\\n' + esc(message['thinking']) + '\\n</think>\\n\\n' }}"
    "{% elif message['role'] == 'assistant' and loop.last and not add_generation_prompt"
    " and enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{{ esc(message['content']) }}"
    "{% if message['role'] == 'user' and message['input'] is defined and message['input'] %}"
    "{{ '\\n\\n' + esc(message['input']) }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


# An assistant message's thinking: "thinking" (lmlab's field), else "reasoning_content" (Qwen3's).
_HF_REASONING = (
    "{% set reasoning = none %}"
    "{% if message['thinking'] is defined and message['thinking'] is not none %}"
    "{% set reasoning = message['thinking'] %}"
    "{% elif message['reasoning_content'] is defined and message['reasoning_content'] is not none %}"
    "{% set reasoning = message['reasoning_content'] %}{% endif %}"
)
_HF_USER_TURN = (
    "{{ '<|im_start|>' + esc(message['role']) + '\\n' + esc(message['content']) }}"
    "{% if message['role'] == 'user' and message['input'] is defined and message['input'] %}"
    "{{ '\\n\\n' + esc(message['input']) }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
)

# Qwen3's template without tools (chat._qwen3_pieces): no bos, no default system message; the
# replies after the last user message (not a tool response) think first, the last one always.
# Unlike Qwen3's own, it does not split a content at `</think>`: content is text (escaped), the
# thinking comes in "thinking" / "reasoning_content".
_HF_QWEN3 = (
    "{% set ns = namespace(last=messages|length - 1, found=false) %}"
    "{% for message in messages[::-1] %}"
    "{% if not ns.found and message['role'] == 'user' and not (message['content'].startswith('<tool_response>')"
    " and message['content'].endswith('</tool_response>')) %}"
    "{% set ns.found = true %}{% set ns.last = messages|length - 1 - loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    + _HF_REASONING +
    "{{ '<|im_start|>assistant\\n' }}"
    "{% if loop.index0 > ns.last and (loop.last or reasoning) %}"
    "{{ '<think>\\n' + esc(reasoning or '').strip('\\n') + '\\n</think>\\n\\n'"
    " + esc(message['content']).lstrip('\\n') }}"
    "{% else %}{{ esc(message['content']) }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}" + _HF_USER_TURN + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def _hf_smollm3() -> str:
    """SmolLM3's template without tools (chat._smollm3_pieces): its system header (today's date by
    `strftime_now`, as its own template writes it; no `<|im_end|>` after it but with
    /system_override), the /think or /no_think mode, no system turn. A reply's thinking comes in
    "thinking" / "reasoning_content" (its own template takes it in the content); the transformers-only
    `{% generation %}` tag is left out (GGUF readers carry this text too)."""
    strip_modes = ".replace('/no_think', '').replace('/think', '').rstrip()"
    return (
        "{% set ns = namespace(think=not (enable_thinking is defined and not enable_thinking)) %}"
        "{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}"
        "{% if system is not none %}{% if '/no_think' in system %}{% set ns.think = false %}"
        "{% elif '/think' in system %}{% set ns.think = true %}{% endif %}{% endif %}"
        "{{ '<|im_start|>system\\n' }}"
        "{% if system is not none and '/system_override' in system %}"
        "{{ esc(system" + strip_modes + ".replace('/system_override', '').rstrip()) + '<|im_end|>\\n' }}"
        "{% else %}"
        "{{ '## Metadata\\n\\nKnowledge Cutoff Date: " + _js(SMOLLM3_CUTOFF) + "\\nToday Date: ' + strftime_now('"
        + _js(SMOLLM3_DATE_FORMAT) + "') + '\\nReasoning Mode: ' + ('/think' if ns.think else '/no_think')"
        " + '\\n\\n## Custom Instructions\\n\\n' }}"
        "{% set custom = system" + strip_modes + " if system is not none else '' %}"
        "{% if custom %}{{ esc(custom) }}{% elif ns.think %}{{ '" + _js(SMOLLM3_SYSTEM_THINK) + "' }}"
        "{% else %}{{ '" + _js(SMOLLM3_SYSTEM_NO_THINK) + "' }}{% endif %}{{ '\\n\\n' }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        + _HF_REASONING +
        "{{ '<|im_start|>assistant\\n' }}"
        "{% if not ns.think %}"
        "{% if reasoning is not none %}{{ raise_exception('smollm3: an assistant message carries thinking, but the "
        "conversation is in /no_think mode') }}{% endif %}"
        "{{ '<think>\\n\\n</think>\\n' + esc(message['content']).lstrip('\\n') }}"
        "{% elif reasoning is not none %}"
        "{{ '<think>\\n' + esc(reasoning) + '\\n</think>\\n' + esc(message['content']) }}"
        "{% else %}{{ esc(message['content']).lstrip('\\n') }}{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% elif message['role'] == 'user' %}" + _HF_USER_TURN + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% if not ns.think %}{{ '<think>\\n\\n</think>\\n' }}{% endif %}{% endif %}"
    )


def _hf_chatml_variant(template: str) -> str:
    """An imported ChatML variant: no bos, the default system message when the first is not one."""
    return ("{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}"
            "{{ '<|im_start|>system\\n" + _js(DEFAULT_SYSTEM[template]) + "<|im_end|>\\n' }}{% endif %}"
            + _HF_CHATML.split("{% for message in messages %}", 1)[1])


def _hf_eos_template(user_open: str, user_close: str, header: str, reply_prefix: str) -> str:
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ esc(message['content']) + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '" + user_open + "' + esc(message['content']) }}"
        "{% if message['input'] is defined and message['input'] %}{{ '\\n\\n' + esc(message['input']) }}{% endif %}"
        "{{ '" + user_close + "' }}"
        "{% else %}{{ '" + header + reply_prefix + "' + esc(message['content']) + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + header + "' }}{% endif %}"
    )


def _js(s: str) -> str:
    """A Python string as the inside of a single-quoted Jinja literal."""
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


_HF_ALPACA = (
    "{{ bos_token }}{% set ns = namespace(started=false) %}"
    "{% for message in messages %}"
    "{% set has_input = message['input'] is defined and message['input'] %}"
    "{% if message['role'] == 'system' %}{{ esc(message['content']) + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if not ns.started %}{% if has_input %}{{ '" + _js(ALPACA_PREAMBLE_INPUT) + "' }}"
    "{% else %}{{ '" + _js(ALPACA_PREAMBLE) + "' }}{% endif %}{% endif %}"
    "{{ '### Instruction:\\n' + esc(message['content']) + '\\n\\n' }}"
    "{% if has_input %}{{ '### Input:\\n' + esc(message['input']) + '\\n\\n' }}{% endif %}"
    "{% else %}{{ '### Response:\\n' + esc(message['content']) + eos_token }}{% endif %}"
    "{% set ns.started = true %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if not ns.started %}{{ '" + _js(ALPACA_PREAMBLE) + "' }}{% endif %}"
    "{{ '### Response:\\n' }}{% endif %}"
)


# Gemma 3's template (no system turn: it opens the next turn; text trimmed), plus lmlab's escaping,
# the Alpaca input folded into the user text, and a trailing system message kept as a user turn.
_HF_GEMMA = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.prefix = esc(message['content']) + '\\n\\n' %}"
    "{% else %}"
    "{% set text = esc(message['content']) %}"
    "{% if message['role'] == 'user' and message['input'] is defined and message['input'] %}"
    "{% set text = text + '\\n\\n' + esc(message['input']) %}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\\n' + ns.prefix"
    " + (text | trim) + '<end_of_turn>\\n' }}"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if ns.prefix %}{{ '<start_of_turn>user\\n' + ns.prefix + '<end_of_turn>\\n' }}{% endif %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _hf_escape_macro(tokens: tuple[str, ...]) -> str:
    """`esc(s)`: `escape_specials(s, tokens)` in Jinja, the same replacements in the same order."""
    body = "s" + "".join(f" | replace('{_js(t)}', '{_js(t[0] + TEXT_BREAK + t[1:])}')" for t in tokens)
    return "{% macro esc(s) %}{{ " + body + " }}{% endmacro %}"


def hf_chat_template(template: str, tokenizer=None) -> str:
    """The Jinja chat template for transformers' `apply_chat_template`, equal to `render_text`
    (messages escaped against `tokenizer`'s special tokens; when None: see `control_tokens`)."""
    _check_name(template)
    tokens = control_tokens(tokenizer, template)
    if template == "gemma":
        body = _HF_GEMMA
    elif template == "chatml":
        body = _HF_CHATML
    elif template == "think":
        body = _HF_THINK
    elif template == "qwen3":
        body = _HF_QWEN3
    elif template == "smollm3":
        body = _hf_smollm3()
    elif template in DEFAULT_SYSTEM:
        body = _hf_chatml_variant(template)
    elif template == "instruct":
        body = _hf_eos_template("### Instruction:\\n", "\\n\\n", "### Response:\\n", "")
    elif template == "chat":
        body = _hf_eos_template("Human: ", "\\n", "Assistant:", " ")
    else:
        body = _HF_ALPACA
    return _hf_escape_macro(tokens) + body
