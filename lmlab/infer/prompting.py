"""Prompting for generation: which chat template a model speaks, the prompt it continues, and
where its completion stops. Every verb that generates goes through here, so `chat`, `eval`,
`pairs`, SFT's samples (and a server) prompt and stop the same way.

    from lmlab.infer.prompting import (StopStream, chat_stops, question_prompt, resolve_template,
                                       truncate_at_stop)
    template = resolve_template("runs/x/sft", tokenizer)        # its chat.json, else chatml
    ids = question_prompt(template, "What is 2+2?", tokenizer)   # the question as the user turn
    stops = chat_stops(template, tokenizer, extra=["\\n\\n"])    # end-of-turn ids + stop strings
    text, stopped = truncate_at_stop(completion, stops.strings)  # cut before the earliest stop
    stream = StopStream(stops.strings, tokenizer)                 # the same, token by token:
    for t in new_ids: show(stream.push_token(t))                  #   never shows a stop's text
    show(stream.finish())                                         #   stream.text == the cut text

The templates themselves (rendering, end-of-turn tokens, chat.json) are lmlab.data.chat's;
this module decides which one applies and how a reply ends. A reply ends at one of the
template's end-of-turn ids (`Stops.ids`, never part of the text) or before the first of its
stop strings (`Stops.strings`: the model starting another turn, plus the user's stops).

Streaming: text arrives a token at a time and a stop string may span tokens, so a
`StopStream` holds back any tail of the text that could still be the start of a stop string
and releases it once the next text shows it is not. Token ids become text through
`Detokenizer`, which decodes a short window (text-generation-inference's prefix/read offsets:
constant work per token) and waits while the text ends in an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

# ----------------------------------------------------------------------------- templates


def resolve_template(model_dir: str | Path | None, tokenizer=None, template: Optional[str] = None,
                     default: Optional[str] = "chatml") -> Optional[str]:
    """The chat template to prompt a model with: `template` when given, else the one in the
    run dir's chat.json, else `default` (None: no template, the caller decides what that means).

    An unknown name is a UserError listing the templates; with `tokenizer`, so is a template
    whose special tokens the tokenizer lacks.
    """
    from lmlab.data.chat import check_template, load_chat_template, required_tokens

    name = template or (load_chat_template(model_dir) if model_dir is not None else None) or default
    if name is None:
        return None
    if tokenizer is not None:
        check_template(name, tokenizer)
    else:
        required_tokens(name)  # validates the name
    return name


def question_prompt(template: str, question: str, tokenizer, shots: Sequence[tuple[str, str]] = (),
                    max_len: Optional[int] = None, thinking: bool = True) -> list[int]:
    """Prompt ids asking `question` as the user turn, after `shots` ((question, answer) pairs)
    as earlier exchanges; `max_len` drops the oldest turns first, `thinking=False` ends a
    thinking template's prompt with an empty thinking block (data.chat.prompt_ids)."""
    from lmlab.data.chat import prompt_ids

    messages = []
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return prompt_ids(template, messages, tokenizer, max_len=max_len, thinking=thinking)


def prompt_room(model, option: str, new_tokens: int) -> int:
    """Tokens the model's context leaves a prompt after `new_tokens` generated ones; a UserError
    naming `option` (max_new_tokens, max_completion_length) when it leaves none."""
    from lmlab.errors import UserError

    ctx = int(model.cfg.max_seq_len)
    if new_tokens >= ctx:
        raise UserError(f"{option}={new_tokens} leaves no room for the prompt in the model's {ctx}-token context; "
                        f"lower it")
    return ctx - new_tokens


# ----------------------------------------------------------------------------- stops

@dataclass(frozen=True)
class Stops:
    """Where a completion ends: before the first of `strings`, or at one of `ids` (not kept)."""
    strings: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()

    def __post_init__(self):
        # empty strings would match everywhere; lists from configs become tuples (hashable, frozen)
        object.__setattr__(self, "strings", tuple(s for s in self.strings if s))
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))


def chat_stops(template: str, tokenizer, extra: Sequence[str] = ()) -> Stops:
    """A chat reply's stops: the template's end-of-turn ids and turn-start strings, plus `extra`."""
    from lmlab.data.chat import end_of_turn_ids, stop_strings

    return Stops(tuple(stop_strings(template)) + tuple(extra), tuple(end_of_turn_ids(template, tokenizer)))


def _first_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (as an index into text), or -1."""
    return min((i for i in (text.find(s, start) for s in stops if s) if i >= 0), default=-1)


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text cut before the earliest stop string, whether one occurred)."""
    cut = _first_stop(text, stops)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Detokenizer:
    """Token ids in, text pieces out: joined, the pieces are `tokenizer.decode(all ids)`.

    Decoding all ids at every token costs O(length) per token; decoding from the previous
    piece's start (`prefix`) and taking what follows its text is constant work, and keeps any
    context the decoder needs at the window's start. A piece is released only when its text
    does not end in U+FFFD (a multi-byte character still missing its last bytes).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the ids of the last released piece
        self.read = 0    # ids up to here are released

    def _window(self) -> tuple[str, str]:
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        return seen, self.tokenizer.decode(self.ids[self.prefix:])

    def push(self, token_id: int) -> str:
        """The text this token completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        seen, full = self._window()
        if len(full) > len(seen) and not full.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return full[len(seen):]
        return ""

    @property
    def pending(self) -> str:
        """Decoded text past the last piece, not yet released (it ends mid-character)."""
        if self.read == len(self.ids):
            return ""
        seen, full = self._window()
        return full[len(seen):]

    def flush(self) -> str:
        """Whatever is pending, incomplete characters and all (the stream has ended)."""
        rest = self.pending
        self.prefix = self.read = len(self.ids)
        return rest


class StopStream:
    """A completion arriving piece by piece: the text safe to show, cut before the first stop string.

    `push(text)` / `push_token(id)` return what may be shown now: never any part of a stop
    string, and not a tail that could still become one (held back until later text rules it
    out, or `finish()`). Once a stop string is complete, `stopped` is True, `text` is the
    completion before it and everything after it is dropped. `finish()` returns the rest.
    The first stop to complete ends the text, as it ends decoding (`stop_checker`); among
    stops completed by the same piece the earliest wins, as in `truncate_at_stop`.
    """

    def __init__(self, stops: Sequence[str] = (), tokenizer=None):
        self.stops = [s for s in stops if s]
        self._longest = max(map(len, self.stops), default=0)
        self.text = ""        # the completion so far (cut before the stop once one is seen)
        self.stopped = False
        self._shown = 0       # characters of `text` already returned
        self._decoder = Detokenizer(tokenizer) if tokenizer is not None else None

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for k in range(min(len(self.text), self._longest - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def _release(self, end: int) -> str:
        out = self.text[self._shown:end] if end > self._shown else ""
        self._shown = max(self._shown, end)
        return out

    def _add(self, piece: str, pending: str = "") -> str:
        if self.stopped:
            return ""
        # A stop completed by this piece ends in it, so starts at most len(stop) - 1 chars before it.
        start = max(0, len(self.text) - self._longest + 1)
        # `pending` (the decoder's incomplete tail) is searched too: a stop string followed by
        # half a character is complete now, not one token later.
        seen = self.text + piece + pending
        cut = _first_stop(seen, self.stops, start)
        if cut >= 0:
            self.text, self.stopped = seen[:cut], True
            return self._release(cut)
        self.text += piece
        return self._release(len(self.text) - self._held())

    def push(self, piece: str) -> str:
        """Add text; return what is now safe to show."""
        return self._add(piece)

    def push_token(self, token_id: int) -> str:
        """Add a token (needs the tokenizer); return what is now safe to show."""
        piece = self._decoder.push(token_id)
        return self._add(piece, self._decoder.pending)

    def finish(self) -> str:
        """The stream has ended: the rest of the text (a held tail that never became a stop)."""
        shown = self._add(self._decoder.flush()) if self._decoder is not None else ""
        return shown + self._release(len(self.text))


def stop_checker(tokenizer, stops: Stops, rows: int) -> Optional[Callable[[int, list[int]], bool]]:
    """`should_stop(row, new_ids)` for `engine.generate_ids`: True once row's newest token is a
    stop id or completes a stop string (one StopStream per row, fed each new token once)."""
    if not stops.strings and not stops.ids:
        return None
    ids = set(stops.ids)
    streams = [StopStream(stops.strings, tokenizer) for _ in range(rows)] if stops.strings else []

    def should_stop(row: int, new: list[int]) -> bool:
        if new[-1] in ids:
            return True
        if not streams:
            return False
        streams[row].push_token(new[-1])
        return streams[row].stopped

    return should_stop
