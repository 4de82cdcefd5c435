"""lm-evaluation-harness's GSM8K answer rules: strict and flexible extraction, exact-match normalisation.

Shared by the arithmetic task's checker (lmlab.tasks.arithmetic) and generative evaluation
(lmlab.eval.generative, which documents the rules); it lives with the tasks because eval
imports tasks, never the reverse.
"""

from __future__ import annotations

import re
from typing import Optional

STRICT_REGEX = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_REGEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE_REGEXES = [",", r"\$", r"(?s).*#### ", r"\.$"]
_STRICT = re.compile(STRICT_REGEX)
_FLEXIBLE = re.compile(FLEXIBLE_REGEX)


def regex_filter(text: str, pattern: re.Pattern, group_select: int = 0) -> Optional[str]:
    """lm-eval's RegexFilter: findall, pick match `group_select`, first non-empty group, strip.

    Returns None where lm-eval returns its "[invalid]" fallback.
    """
    matches = pattern.findall(text)
    if not matches:
        return None
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), None)
        if m is None:
            return None
    return m.strip()


def extract_strict(text: str) -> Optional[str]:
    """The number after the first `#### ` (raw, e.g. '1,000.'), or None."""
    return regex_filter(text, _STRICT, 0)


def extract_flexible(text: str) -> Optional[str]:
    """The last number-like string in the text (raw, e.g. '$18.'), or None."""
    return regex_filter(text, _FLEXIBLE, -1)


def normalize_answer(text: Optional[str]) -> Optional[str]:
    """lm-eval's exact_match preprocessing: drop `,`, `$`, everything up to `#### `, a final `.`; lower-case."""
    if text is None:
        return None
    for r in IGNORE_REGEXES:
        text = re.sub(r, "", text)
    return text.lower()
