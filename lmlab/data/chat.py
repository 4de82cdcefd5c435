"""Chat templates: how a conversation becomes token ids, which of them train, and how a reply ends.

    from lmlab.data.chat import render, prompt_ids, end_of_turn_ids
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = render("chatml", msgs, tokenizer)          # mask: True on "4<|im_end|>"
    ids = prompt_ids("chatml", msgs[:1], tokenizer)         # ... <|im_start|>assistant\\n

A conversation is `list[{"role": "system"|"user"|"assistant", "content": str}]` (a user
message may also carry `"input"`, the Alpaca input field). Templates (see docs/chat.md):

    chatml    <|im_start|>role\\ncontent<|im_end|>\\n   (system is a turn of its own)
    think     chatml whose replies think first: <|im_start|>assistant\\n<think>\\n{thinking}\\n</think>\\n\\n{answer}<|im_end|>
    instruct  ### Instruction:\\n{user}\\n\\n### Response:\\n{reply}<|eos|>
    chat      Human: {user}\\nAssistant: {reply}<|eos|>
    alpaca    the Alpaca preamble, ### Instruction: / ### Input: / ### Response:, <|eos|>
    gemma     <bos><start_of_turn>user\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n
    qwen2, qwen2.5, smollm2    ChatML as those instruction-tuned models write it: no bos, and
              their default system message when the conversation has none (DEFAULT_SYSTEM)
    qwen3     Qwen3's thinking ChatML: no bos, no default system message, the replies after the last
              user message think first (the last always: an empty block when it has no thinking)
    smollm3   SmolLM3's: no bos, its system header (metadata with today's date, /think or /no_think
              mode, the system message's instructions), replies `<think>\\n{thinking}\\n</think>\\n{answer}`

An assistant message may carry `"thinking"` (the text between the thinking delimiters; Qwen3's
name `reasoning_content` is read as it) for the thinking templates (THINKING_TEMPLATES: think,
qwen3, smollm3), whose replies are the thinking and then the answer, as Qwen3 and SmolLM3 write
theirs (the model learns to open `<think>` itself after the assistant header);
`prompt_ids(..., thinking=False)` ends the prompt with an empty thinking block instead (their
`enable_thinking=False`), so the model answers at once, and `render(..., thinking=False)` renders
the reply that follows such a prompt (its ids are the prompt's, then the answer's). Other
templates refuse a "thinking".

`instruct` and `chat` put a system message first as plain text followed by a blank line;
`alpaca` uses it instead of its preamble. Every conversation starts with bos, except in the
imported ChatML variants (qwen2, qwen2.5, smollm2, qwen3, smollm3), which write none, as their
Hugging Face templates do; `lmlab import` detects them (lmlab/models/importer.py). smollm3's
prompts carry today's date, as its own template writes it (`today`).

`gemma` is Gemma's and RecurrentGemma's instruction-tuned format, as their Hugging Face
chat template writes it: no system role (a system message and a blank line are prepended to
the next turn, as Gemma 3's template does), each message's text stripped of surrounding
whitespace (Jinja's `trim`), the reply ends at `<end_of_turn>` (trained, with the reply; the
newline after it is not). Its tokens are Gemma's own (`<bos>`, `<eos>`, `<start_of_turn>`,
`<end_of_turn>`), so it needs a Gemma tokenizer (`lmlab tokenizer from_file=.../tokenizer.model`);
TEMPLATES lists the four every lmlab-trained tokenizer supports, ALL_TEMPLATES adds gemma.

The text is tokenized segment by segment (special tokens inserted as their single ids), so
the train mask is exact: True on each assistant reply and its end-of-turn token, nothing
else. Segments break only after a newline, before a special token or before the space that
opens a `chat` reply, which is where lmlab's tokenizers split anyway, so the ids equal those
of tokenizing the whole rendered text at once; `hf_chat_template` (lmlab/data/chat_jinja.py) gives transformers the
same text as a Jinja template, so `apply_chat_template` on an exported model yields exactly
`prompt_ids` (tested). One more break: in a no-thinking render (`thinking=False`), between the
last reply's empty thinking block and its answer, so that those ids are exactly the no-thinking
prompt's and then the answer's; a tokenizer that splits "\\n\\nText" otherwise than "\\n\\n" +
"Text" (a GPT-2-style byte-level BPE whose vocabulary merges "\\n\\n") tokenizes the whole text
differently there, and only there.

Message text never yields a control token: every special token's string in a message (its
role, content or input) is escaped with `escape_specials` (broken by TEXT_BREAK after its
first character, which the tokenizers drop and split at), so `<|im_end|>` typed by a user is
ordinary text and cannot end the turn. The Jinja template does the same replacements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from lmlab.data.tokenizer import (GEMMA_TURN_TOKENS, SPECIAL_TOKENS, TEXT_BREAK, THINK_CLOSE, THINK_OPEN, escape_order,
                                  escape_specials)
from lmlab.errors import UserError

# The templates every lmlab-trained tokenizer supports (its special tokens are lmlab's).
TEMPLATES = ("chatml", "instruct", "chat", "alpaca", "think")
# The ChatML of imported instruction-tuned models: no bos, and this system message when a
# conversation has none (their Hugging Face chat templates, token for token).
DEFAULT_SYSTEM = {
    "qwen2": "You are a helpful assistant.",  # Qwen1.5 and Qwen2 Instruct
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
}
# The thinking ChatML of imported models (Qwen3, SmolLM3): no bos, replies that think first, as
# their Hugging Face chat templates write them (see `_qwen3_pieces`, `_smollm3_pieces`).
THINKING_IMPORTED = ("qwen3", "smollm3")
# Templates that start a conversation without bos (as the imported models' templates do).
NO_BOS = tuple(DEFAULT_SYSTEM) + THINKING_IMPORTED
CHATML_STYLE = ("chatml", "think") + tuple(DEFAULT_SYSTEM) + THINKING_IMPORTED
# Templates whose replies hold a thinking block between these delimiters.
THINKING_TEMPLATES = ("think",) + THINKING_IMPORTED
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)
# Templates whose tokens come with an imported tokenizer (Gemma's tokenizer.model, the ChatML
# variants' tokenizer.json).
IMPORTED_TEMPLATES = ("gemma",) + tuple(DEFAULT_SYSTEM) + THINKING_IMPORTED
ALL_TEMPLATES = TEMPLATES + IMPORTED_TEMPLATES
DEFAULT_TEMPLATE = "chatml"
ROLES = ("system", "user", "assistant")
CHAT_FILE = "chat.json"

BOS, EOS = "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Gemma's pieces (its tokenizer.model: <pad> 0, <eos> 1, <bos> 2, <unk> 3, the turn markers user-defined).
GEMMA_BOS, GEMMA_EOS = "<bos>", "<eos>"
START_OF_TURN, END_OF_TURN = GEMMA_TURN_TOKENS
GEMMA_TOKENS = (GEMMA_BOS, GEMMA_EOS, START_OF_TURN, END_OF_TURN)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n")

# SmolLM3's system header (its Hugging Face template without tools): the metadata lines, today's
# date among them (`today`), then the system message's text, or one of these when it has none.
SMOLLM3_CUTOFF = "June 2025"
SMOLLM3_DATE_FORMAT = "%d %B %Y"  # the template's strftime_now("%d %B %Y")
SMOLLM3_SYSTEM_THINK = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. "
    "Each step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should "
    "be logical, accurate, and concise and detail necessary steps needed to reach the conclusion.")
SMOLLM3_SYSTEM_NO_THINK = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."

# Truncation policies for render(max_len=...): see `render`.
TRUNCATIONS = ("turns", "head", "error")


# ----------------------------------------------------------------------------- tokenizer access

def _special_ids(tokenizer) -> dict[str, int]:
    """Special token -> id, for an lmlab Tokenizer (`special_tokens`) or a transformers tokenizer."""
    st = getattr(tokenizer, "special_tokens", None)
    if isinstance(st, dict):
        return dict(st)
    vocab = tokenizer.get_vocab()
    return {t: vocab[t] for t in (BOS, EOS, IM_START, IM_END) + THINK_TOKENS + GEMMA_TOKENS if t in vocab}


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "special_tokens"):
        return tokenizer.encode(text)
    # transformers: a tokenizer we did not export has no TEXT_BREAK pre-tokenizer; split here
    return [i for part in text.split(TEXT_BREAK) if part for i in tokenizer.encode(part, add_special_tokens=False)]


def control_tokens(tokenizer=None, template: Optional[str] = None) -> tuple[str, ...]:
    """The special-token strings a tokenizer matches in text, which messages are escaped against.

    Without a tokenizer: lmlab's special tokens, and Gemma's too for the gemma template."""
    if tokenizer is None:
        return tuple(escape_order(SPECIAL_TOKENS + (list(GEMMA_TOKENS) if template == "gemma" else [])))
    ct = getattr(tokenizer, "control_tokens", None)
    if ct is not None:
        return tuple(ct)
    if hasattr(tokenizer, "get_added_vocab"):  # transformers
        return tuple(escape_order(tokenizer.get_added_vocab()))
    return tuple(escape_order(_special_ids(tokenizer)))


def required_tokens(template: str) -> list[str]:
    _check_name(template)
    if template == "gemma":
        return list(GEMMA_TOKENS)
    if template in DEFAULT_SYSTEM:
        return [IM_START, IM_END]
    if template in THINKING_IMPORTED:
        return [IM_START, IM_END, THINK_OPEN, THINK_CLOSE]
    if template in THINKING_TEMPLATES:
        return [BOS, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]
    return [BOS, IM_START, IM_END] if template == "chatml" else [BOS, EOS]


def has_bos(template: str) -> bool:
    """Whether the template starts every conversation with bos (all but the imported ChatML variants,
    qwen3 and smollm3 included)."""
    return template not in NO_BOS


def _check_name(template: str) -> None:
    if template not in ALL_TEMPLATES:
        raise UserError(f"unknown chat template '{template}'; valid: {', '.join(ALL_TEMPLATES)}")


def check_template(template: str, tokenizer) -> None:
    """UserError when `tokenizer` lacks a special token that `template` needs (each must be one id);
    the message lists the templates the tokenizer does support."""
    _check_name(template)
    have = _special_ids(tokenizer)
    missing = [t for t in required_tokens(template) if t not in have]
    if missing:
        works = [t for t in ALL_TEMPLATES if all(x in have for x in required_tokens(t))]
        where = getattr(tokenizer, "path", None) or getattr(tokenizer, "name_or_path", "the tokenizer")
        fix = (f"import Gemma's tokenizer.model with `lmlab tokenizer from_file=PATH/tokenizer.model`: it holds "
               f"{START_OF_TURN} and {END_OF_TURN}" if template == "gemma" else
               f"retrain the tokenizer: lmlab tokenizers include {IM_START}, {IM_END}, {THINK_OPEN} and "
               f"{THINK_CLOSE} (the thinking delimiters since December 2026)")
        raise UserError(f"chat template '{template}' needs special token(s) {', '.join(missing)}, which {where} lacks; "
                        + (f"use template={' or template='.join(works)}" if works else
                           "no template works with it (it has no bos/eos token); use an lmlab tokenizer")
                        + f" (or {fix})")


def check_thinking_template(template: Optional[str], tokenizer, where: str) -> None:
    """UserError unless `template` is a thinking template whose delimiters the tokenizer holds."""
    if template not in THINKING_TEMPLATES:
        raise UserError(f"{where}: the model's chat template is {template or 'none'}, which has no thinking "
                        f"delimiters ({' '.join(THINK_TOKENS)}); the thinking templates are "
                        f"{', '.join(THINKING_TEMPLATES)}: train a thinking model first (`lmlab tasks "
                        f"thinking=true`, then `lmlab sft template=think`), import a Qwen3 or SmolLM3 model, "
                        f"or set template=think")
    check_template(template, tokenizer)


# ----------------------------------------------------------------------------- conversations

def validate_conversation(messages, where: str = "conversation", need_assistant: bool = True) -> list[dict]:
    """The messages as clean {role, content[, input]} dicts, or UserError naming `where` and the problem."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: a conversation must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {i} is {type(m).__name__}, expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}: message {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise UserError(f"{where}: message {i} is a system message; a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}: message {i} ({role}) has an empty or missing content")
        clean = {"role": role, "content": content}
        thinking = m.get("thinking", m.get("reasoning_content"))  # reasoning_content: Qwen3's name for it
        if thinking is not None:
            if role != "assistant" or not isinstance(thinking, str):
                raise UserError(f"{where}: message {i}: only an assistant message may carry a text 'thinking'")
            clean["thinking"] = thinking
        if m.get("input"):
            if role != "user" or not isinstance(m["input"], str):
                raise UserError(f"{where}: message {i}: only a user message may carry a text 'input'")
            clean["input"] = m["input"]
        out.append(clean)
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn, so there is nothing to train on")
    return out


# ----------------------------------------------------------------------------- rendering
# A rendered conversation is a list of pieces (text_or_special, train, turn): `turn` counts
# user->assistant exchanges so truncation can drop whole later turns.

def _user_text(m: dict, template: str) -> str:
    """The user message with an Alpaca `input` folded in for templates without an Input section."""
    if m.get("input") and template != "alpaca":
        return m["content"] + "\n\n" + m["input"]
    return m["content"]


def _escaped(messages: list[dict], tokens: tuple[str, ...]) -> list[dict]:
    return [{k: escape_specials(v, tokens) if isinstance(v, str) else v for k, v in m.items()} for m in messages]


def _pieces(template: str, messages: list[dict], generation_prompt: bool,
            tokens: tuple[str, ...], thinking: bool = True) -> list[tuple[str, bool, bool, int]]:
    """(text, is_special, train, turn) pieces of the conversation, bos first (see `has_bos`); the
    messages' text escaped against `tokens` (so only the template writes special tokens).

    An empty text piece ("") is no text: it ends the text segment before it (`_tokenize` encodes the
    two sides apart), where a no-thinking prompt ends in the last reply (see `_empty_thinking`)."""
    _check_name(template)
    # reasoning_content: Qwen3's name for the thinking (as validate_conversation and transformers read it)
    messages = [{**m, "thinking": m["reasoning_content"]} if "thinking" not in m
                and m.get("reasoning_content") is not None else m for m in messages]
    if template not in THINKING_TEMPLATES and any(m.get("thinking") is not None for m in messages):
        raise UserError(f"a message carries 'thinking', which the {template} template has no delimiters for; use "
                        f"a thinking template (template=think, {' or '.join(THINKING_IMPORTED)}) or drop the field")
    if template == "qwen3":
        return _qwen3_pieces(messages, generation_prompt, tokens, thinking)
    if template == "smollm3":
        return _smollm3_pieces(messages, generation_prompt, tokens, thinking)
    messages = _escaped(messages, tokens)
    if template == "gemma":
        return _gemma_pieces(messages, generation_prompt)
    p: list[tuple[str, bool, bool, int]] = [(BOS, True, False, 0)] if has_bos(template) else []
    if template in DEFAULT_SYSTEM and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM[template]}] + messages
    turn, started = 0, False

    def text(s, train=False):
        p.append((s, False, train, turn))

    def special(s, train=False):
        p.append((s, True, train, turn))

    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user" and any(x[3] == turn and x[2] for x in p):
            turn += 1  # a new exchange begins after an assistant reply
        if template in CHATML_STYLE:
            special(IM_START)
            if role == "assistant":
                text("assistant\n")
                if m.get("thinking") is not None:
                    special(THINK_OPEN, True)
                    text("\n" + m["thinking"] + "\n", True)
                    special(THINK_CLOSE, True)
                    text("\n\n", True)
                elif template == "think" and not thinking and i == len(messages) - 1 and not generation_prompt:
                    p.extend(_empty_thinking("\n\n", True, turn, True))  # the no-thinking prompt's block, trained
                text(m["content"], True)
                special(IM_END, True)
            else:
                text(f"{role}\n" + (_user_text(m, template) if role == "user" else m["content"]))
                special(IM_END)
            text("\n")
        elif role == "system":
            text(m["content"] + "\n\n")
        elif role == "user":
            if template == "instruct":
                text("### Instruction:\n" + _user_text(m, template) + "\n\n")
            elif template == "chat":
                text("Human: " + _user_text(m, template) + "\n")
            else:  # alpaca
                if not started:
                    text(ALPACA_PREAMBLE_INPUT if m.get("input") else ALPACA_PREAMBLE)
                text("### Instruction:\n" + m["content"] + "\n\n"
                     + (f"### Input:\n{m['input']}\n\n" if m.get("input") else ""))
        else:  # assistant
            text(_assistant_header(template))
            text((" " if template == "chat" else "") + m["content"], True)
            special(EOS, True)
        started = True
    if generation_prompt:
        if template in CHATML_STYLE:
            special(IM_START)
        elif template == "alpaca" and not started:
            text(ALPACA_PREAMBLE)
        text(_assistant_header(template))
        if template in THINKING_TEMPLATES and not thinking:  # an empty thinking block: answer at once
            p.extend(_empty_thinking("\n\n", False, turn))
    return p


def _empty_thinking(after: str, train: bool, turn: int, last: bool = False) -> list[tuple[str, bool, bool, int]]:
    """`<think>\\n\\n</think>` and `after`: the block a no-thinking generation prompt ends with, which
    a reply rendered in that mode starts with. In the conversation's last reply (`last`) a segment
    break follows, so that `render`'s ids are exactly the no-thinking prompt's and then the
    answer's, whatever the tokenizer does with the newlines and the text after them (a GPT-2-style
    pre-tokenizer, byte-level BPE's, splits "\\n\\nIt" into "\\n", "\\n", "It" but keeps a final
    "\\n\\n" whole, which the vocabulary may hold as one token). Elsewhere (history in a prompt)
    the text runs on, as transformers tokenizes the whole rendered text."""
    return [(THINK_OPEN, True, train, turn), ("\n\n", False, train, turn), (THINK_CLOSE, True, train, turn),
            (after, False, train, turn)] + ([("", False, train, turn)] if last else [])


class _Pieces(list):
    """The pieces of one conversation as `_pieces` returns them, with the turn count it keeps."""

    def __init__(self):
        super().__init__()
        self.turn = 0

    def text(self, s: str, train: bool = False) -> None:
        self.append((s, False, train, self.turn))

    def special(self, s: str, train: bool = False) -> None:
        self.append((s, True, train, self.turn))

    def user_turn(self) -> None:
        if any(x[3] == self.turn and x[2] for x in self):
            self.turn += 1  # a new exchange begins after an assistant reply

    def generation_prompt(self, empty_block: Optional[str] = None) -> None:
        """The assistant header a reply follows; with `empty_block`, the empty thinking block
        (followed by that text) that makes the model answer at once."""
        self.special(IM_START)
        self.text("assistant\n")
        if empty_block is not None:
            self.extend(_empty_thinking(empty_block, False, self.turn))

    def message(self, role: str, text: str) -> None:
        self.special(IM_START)
        self.text(f"{role}\n{text}")
        self.special(IM_END)
        self.text("\n")


def _qwen3_pieces(messages: list[dict], generation_prompt: bool, tokens: tuple[str, ...],
                  thinking: bool) -> list[tuple[str, bool, bool, int]]:
    """Qwen3's template (its Hugging Face chat template without tools): ChatML, no bos, no default
    system message. The replies after the last user message think first,
    `<think>\\n{thinking}\\n</think>\\n\\n{answer}`: the last reply always (an empty block when it
    has no thinking), an earlier one of them only when it has thinking; the replies before the
    last user message are their answer alone (their thinking is dropped, as Qwen3's template
    drops it). The thinking's surrounding newlines and the answer's leading ones are stripped.

    `thinking` changes only the generation prompt, which ends with an empty thinking block when it
    is False (`enable_thinking=False`): Qwen3 renders history the same either way, save that a
    reply without thinking is then set apart from its empty block (see `_empty_thinking`)."""
    last_query = len(messages) - 1  # as the template: a user message that is not a tool response
    for i in range(len(messages) - 1, -1, -1):
        c = messages[i]["content"]
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
            last_query = i
            break
    messages = _escaped(messages, tokens)
    p = _Pieces()
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user":
            p.user_turn()
            p.message("user", _user_text(m, "qwen3"))
        elif role == "system":
            p.message("system", m["content"])
        else:
            p.special(IM_START)
            p.text("assistant\n")
            reasoning = m.get("thinking") or ""
            if i > last_query and (i == len(messages) - 1 or reasoning):
                reasoning = reasoning.strip("\n")
                if not reasoning and not thinking:
                    p.extend(_empty_thinking("\n\n", True, p.turn, i == len(messages) - 1))
                else:
                    p.special(THINK_OPEN, True)
                    p.text("\n" + reasoning + "\n", True)
                    p.special(THINK_CLOSE, True)
                    p.text("\n\n", True)
                p.text(m["content"].lstrip("\n"), True)
            else:
                p.text(m["content"], True)
            p.special(IM_END, True)
            p.text("\n")
    if generation_prompt:
        p.generation_prompt(None if thinking else "\n\n")
    return list(p)


def today() -> str:
    """Today's date as SmolLM3's template writes it (`strftime_now("%d %B %Y")`: the local date, the
    month named in the process's locale), e.g. "05 March 2026"."""
    import datetime
    return datetime.datetime.now().strftime(SMOLLM3_DATE_FORMAT)


def smollm3_thinks(messages: list[dict], thinking: bool = True) -> bool:
    """Whether SmolLM3's template is in /think mode: `thinking`, unless the system message says
    "/no_think" (or else "/think")."""
    if messages and messages[0]["role"] == "system":
        if "/no_think" in messages[0]["content"]:
            return False
        if "/think" in messages[0]["content"]:
            return True
    return thinking


def _smollm3_pieces(messages: list[dict], generation_prompt: bool, tokens: tuple[str, ...],
                    thinking: bool) -> list[tuple[str, bool, bool, int]]:
    """SmolLM3's template (its Hugging Face chat template without tools), no bos: a system header
    always, `<|im_start|>system\\n## Metadata\\n\\nKnowledge Cutoff Date: June 2025\\nToday Date:
    {today}\\nReasoning Mode: /think\\n\\n## Custom Instructions\\n\\n{instructions}\\n\\n` with no
    `<|im_end|>` (the template writes that only with tools), then the user and assistant turns
    (the system message is not a turn). The instructions are the system message without its
    "/think" / "/no_think" (and trailing whitespace), or the model's default one for the mode; a
    system message with "/system_override" is the header alone, `<|im_start|>system\\n{it}<|im_end|>\\n`.

    The mode (`smollm3_thinks`) is /think unless `thinking=False`, a system message's "/no_think"
    or "/think" deciding over it. /think: a reply is its answer, or, with thinking,
    `<think>\\n{thinking}\\n</think>\\n{answer}` (one newline after the block: what the model writes,
    the content the template is given); /no_think: every reply, and the generation prompt, starts
    with the empty block `<think>\\n\\n</think>\\n`, so a reply may carry no thinking."""
    think = smollm3_thinks(messages, thinking)
    if not think and any(m.get("thinking") is not None for m in messages):
        raise UserError("smollm3: an assistant message carries 'thinking', but the conversation is in /no_think "
                        "mode (thinking=False, or /no_think in the system message), where every reply starts with "
                        "an empty thinking block; drop the thinking or the /no_think")
    p = _Pieces()
    p.special(IM_START)
    rest = messages
    instructions = ""
    if messages and messages[0]["role"] == "system":
        rest = messages[1:]
        system = messages[0]["content"]
        instructions = system.replace("/no_think", "").replace("/think", "").rstrip()
        if "/system_override" in system:
            p.text("system\n" + escape_specials(instructions.replace("/system_override", "").rstrip(), tokens))
            p.special(IM_END)
            p.text("\n")
            instructions = None
    if instructions is not None:
        instructions = (escape_specials(instructions, tokens) if instructions else
                        SMOLLM3_SYSTEM_THINK if think else SMOLLM3_SYSTEM_NO_THINK)
        p.text(f"system\n## Metadata\n\nKnowledge Cutoff Date: {SMOLLM3_CUTOFF}\nToday Date: {today()}\n"
               f"Reasoning Mode: {'/think' if think else '/no_think'}\n\n## Custom Instructions\n\n{instructions}\n\n")
    for i, m in enumerate(_escaped(rest, tokens)):
        if m["role"] == "user":
            p.user_turn()
            p.message("user", _user_text(m, "smollm3"))
        elif m["role"] == "assistant":
            p.special(IM_START)
            p.text("assistant\n")
            if not think:
                p.extend(_empty_thinking("\n", True, p.turn, i == len(rest) - 1))
                p.text(m["content"].lstrip("\n"), True)
            elif m.get("thinking") is not None:
                p.special(THINK_OPEN, True)
                p.text("\n" + m["thinking"] + "\n", True)
                p.special(THINK_CLOSE, True)
                p.text("\n" + m["content"], True)
            else:
                p.text(m["content"].lstrip("\n"), True)
            p.special(IM_END, True)
            p.text("\n")
    if generation_prompt:
        p.generation_prompt(None if think else "\n")
    return list(p)


def _gemma_pieces(messages: list[dict], generation_prompt: bool) -> list[tuple[str, bool, bool, int]]:
    """The gemma template's pieces (messages already escaped): see the module docstring.

    As in Gemma 3's Hugging Face template, a system message is no turn: its text and a blank line
    open the next turn (a system message with nothing after it becomes a user turn of its own,
    rather than being lost), and each message's text is stripped (`| trim`)."""
    p: list[tuple[str, bool, bool, int]] = [(GEMMA_BOS, True, False, 0)]
    turn, prefix = 0, ""
    for m in messages:
        role = m["role"]
        if role == "system":
            prefix = m["content"] + "\n\n"
            continue
        if role == "user" and any(x[3] == turn and x[2] for x in p):
            turn += 1  # a new exchange begins after an assistant reply
        p.append((START_OF_TURN, True, False, turn))
        if role == "assistant":
            p.append(("model\n" + prefix, False, False, turn))
            p.append((m["content"].strip(), False, True, turn))
            p.append((END_OF_TURN, True, True, turn))
        else:
            p.append(("user\n" + prefix + _user_text(m, "gemma").strip(), False, False, turn))
            p.append((END_OF_TURN, True, False, turn))
        p.append(("\n", False, False, turn))
        prefix = ""
    if prefix:
        p += [(START_OF_TURN, True, False, turn), ("user\n" + prefix, False, False, turn),
              (END_OF_TURN, True, False, turn), ("\n", False, False, turn)]
    if generation_prompt:
        p += [(START_OF_TURN, True, False, turn), ("model\n", False, False, turn)]
    return p


def _assistant_header(template: str) -> str:
    if template in CHATML_STYLE:
        return "assistant\n"
    return { "instruct": "### Response:\n", "chat": "Assistant:",
            "alpaca": "### Response:\n"}[template]


def _tokenize(pieces, tokenizer) -> tuple[list[int], list[bool], list[int]]:
    """ids, mask and turn index per token; adjacent text pieces of the same mask/turn encode together."""
    specials = _special_ids(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    turns: list[int] = []
    buf, buf_train, buf_turn = "", False, 0

    def flush():
        nonlocal buf
        if buf:
            t = _encode(tokenizer, buf)
            ids.extend(t)
            mask.extend([buf_train] * len(t))
            turns.extend([buf_turn] * len(t))
            buf = ""

    for s, is_special, train, turn in pieces:
        if is_special:
            flush()
            if s not in specials:
                raise UserError(f"the tokenizer has no special token {s}; run check_template first")
            ids.append(specials[s])
            mask.append(train)
            turns.append(turn)
        elif not s:  # a segment break (see `_pieces`)
            flush()
        else:
            if buf and (train, turn) != (buf_train, buf_turn):
                flush()
            buf += s
            buf_train, buf_turn = train, turn
    flush()
    return ids, mask, turns


def render_text(template: str, messages: list[dict], add_generation_prompt: bool = False, tokenizer=None,
                thinking: bool = True) -> str:
    """The conversation as text, special tokens spelled out (what chat_jinja's `hf_chat_template` produces);
    messages escaped against `tokenizer`'s special tokens (when None: see `control_tokens`)."""
    tokens = control_tokens(tokenizer, template)
    return "".join(s for s, *_ in _pieces(template, messages, add_generation_prompt, tokens, thinking))


def render(template: str, messages: list[dict], tokenizer, max_len: Optional[int] = None,
           truncation: str = "turns", stats: Optional[dict] = None,
           thinking: bool = True) -> tuple[list[int], list[bool]]:
    """(ids, train_mask) for a whole conversation; mask True on assistant replies + their end token
    (and a thinking template's thinking block, written as part of the reply).

    `thinking=False` renders a thinking template in its no-thinking mode, the last reply as it
    follows `prompt_ids(..., thinking=False)`: `think` and `qwen3` give the last reply, when it has
    no thinking, the empty block `<think>\\n\\n</think>\\n\\n` before its answer (qwen3 writes that
    block in either mode; earlier replies are rendered as in a prompt's history, which
    `thinking` does not change), smollm3 writes its /no_think header and starts every reply with
    `<think>\\n\\n</think>\\n` (a reply with thinking is then an error). So
    `render(t, [user, reply], tok, thinking=False)` starts with exactly
    `prompt_ids(t, [user], tok, thinking=False)`, and the answer's tokens follow (see
    `_empty_thinking`). For the other templates `thinking` changes nothing (as in prompt_ids).

    When `max_len` is given and the conversation is longer:
      truncation="turns" (default) keeps the head: whole later exchanges (user turn + reply)
        are dropped until it fits; if even the first exchange is too long, its tail is cut.
      truncation="head" cuts the token sequence at max_len (a reply may be cut mid-way).
      truncation="error" raises UserError.
    `stats` (a dict), when given, counts `truncated` conversations, `dropped_turns` and
    `cut_tokens`; `no_target` counts conversations left with no trained token.
    """
    if truncation not in TRUNCATIONS:
        raise UserError(f"unknown truncation '{truncation}'; valid: {', '.join(TRUNCATIONS)}")
    ids, mask, turns = _tokenize(_pieces(template, messages, False, control_tokens(tokenizer, template), thinking),
                                 tokenizer)
    if max_len is not None and len(ids) > max_len:
        if truncation == "error":
            raise UserError(f"a conversation has {len(ids)} tokens, more than max_len={max_len}; raise the "
                            f"context length or use truncation=turns (drop later turns) or truncation=head")
        n_before = len(ids)
        dropped = 0
        if truncation == "turns":
            # keep exchanges 0..last, the most that end within max_len (at least the first)
            ends = [turns.index(t + 1) if t + 1 in turns else len(ids) for t in range(turns[-1] + 1)]
            last = max([t for t, e in enumerate(ends) if e <= max_len], default=0)
            dropped = turns[-1] - last
            ids, mask = ids[:ends[last]], mask[:ends[last]]
        ids, mask = ids[:max_len], mask[:max_len]
        if stats is not None:
            stats["truncated"] = stats.get("truncated", 0) + 1
            stats["dropped_turns"] = stats.get("dropped_turns", 0) + dropped
            stats["cut_tokens"] = stats.get("cut_tokens", 0) + n_before - len(ids)
    if stats is not None and not any(mask):
        stats["no_target"] = stats.get("no_target", 0) + 1
    return ids, mask


def prompt_ids(template: str, messages: list[dict], tokenizer, max_len: Optional[int] = None,
               stats: Optional[dict] = None, thinking: bool = True) -> list[int]:
    """The conversation so far plus the assistant header: what the model continues to reply.

    With `max_len`, history is truncated from the left: the oldest messages after an
    optional system message are dropped one by one until the prompt fits; if the last
    message alone is still too long, bos (where the template writes one) is kept and the
    tokens right after it are cut.
    `stats`, when given, counts `dropped_messages` and `cut_tokens`. `thinking=False` (a
    thinking template only; the others ignore it) closes an empty thinking block after the header:
    the reply is the answer (Qwen3's and SmolLM3's `enable_thinking=False`; smollm3 also writes its
    /no_think header, unless the system message says "/think").
    """
    msgs = list(messages)
    tokens = control_tokens(tokenizer, template)
    ids = _tokenize(_pieces(template, msgs, True, tokens, thinking), tokenizer)[0]
    if max_len is None or len(ids) <= max_len:
        return ids
    head = 1 if msgs and msgs[0]["role"] == "system" else 0
    dropped = 0
    while len(ids) > max_len and len(msgs) - head > 1:
        del msgs[head]
        dropped += 1
        ids = _tokenize(_pieces(template, msgs, True, tokens, thinking), tokenizer)[0]
    cut = 0
    if len(ids) > max_len:
        cut = len(ids) - max_len
        keep = 1 if has_bos(template) else 0
        ids = ids[:keep] + ids[keep + cut:]
    if stats is not None:
        stats["dropped_messages"] = stats.get("dropped_messages", 0) + dropped
        stats["cut_tokens"] = stats.get("cut_tokens", 0) + cut
    return ids


def stop_strings(template: str) -> list[str]:
    """Text that, when generated, means the model has started another turn (cut the reply there)."""
    _check_name(template)
    if template in CHATML_STYLE:
        return [IM_END, IM_START]
    return {"instruct": ["### Instruction:", "### Response:"],
            "chat": ["\nHuman:", "\nAssistant:"], "alpaca": ["### Instruction:", "### Input:", "### Response:"],
            "gemma": [END_OF_TURN, START_OF_TURN]}[template]


def end_of_turn_ids(template: str, tokenizer) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn token first, then eos if different."""
    _check_name(template)
    specials = _special_ids(tokenizer)
    names = [IM_END, EOS] if template in CHATML_STYLE else {"gemma": [END_OF_TURN, GEMMA_EOS]}.get(template, [EOS])
    return [specials[n] for n in names if n in specials]


# ----------------------------------------------------------------------------- chat.json

def save_chat_template(run_dir: str | Path, name: Optional[str]) -> Path:
    """Write `chat.json` ({"template", "stop_strings"}) into a model run dir.

    `name=None` says the model is not a chat model (e.g. SFT on raw prompt/completion data):
    any chat.json is removed, since a stale one from an earlier run in the same directory would
    make `lmlab chat` and eval prompt the model in a template it was never trained on."""
    from lmlab.artifacts import write_json_atomic
    path = Path(run_dir) / CHAT_FILE
    if name is None:
        path.unlink(missing_ok=True)
        return path
    _check_name(name)
    write_json_atomic(path, {"template": name, "stop_strings": stop_strings(name)})
    return path


def load_chat_template(run_dir: str | Path) -> Optional[str]:
    """The template recorded in a model run dir's chat.json, or None when it has none."""
    path = Path(run_dir) / CHAT_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text()).get("template")
    except (OSError, json.JSONDecodeError, AttributeError):
        raise UserError(f"{path} is not a readable chat.json ({{\"template\": NAME}}); rewrite or delete it") from None
    if name not in ALL_TEMPLATES:
        raise UserError(f"{path}: unknown chat template {name!r}; valid: {', '.join(ALL_TEMPLATES)}")
    return name
