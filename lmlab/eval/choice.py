"""Multiple choice by log-likelihood (lm-evaluation-harness conventions): acc and acc_norm.

    from lmlab.eval.choice import read_choice_file, score_choices
    items = read_choice_file("data/arc_easy.jsonl")
    res = score_choices(model, tokenizer, items)       # {"acc": ..., "acc_norm": ..., "n": ...}

Each choice is scored as the summed log-probability of the continuation `" " + choice`
after the context (lm-eval's `target_delimiter`); the context's token ids are those of
`encode(context)`, the continuation's the rest of `encode(context + " " + choice)`, as
lm-eval splits them. `acc`: the highest sum is the gold choice. `acc_norm`: the highest
sum divided by the choice's length in characters.

Formats (detected per file from the first record):
  BoolQ  {"question", "passage", "answer": bool}      -> "{passage}\\nQuestion: {question}?\\nAnswer:", ["no", "yes"]
  ARC    {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}
                                                     -> "Question: {question}\\nAnswer:", choices["text"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lmlab.errors import UserError


def _boolq(rec: dict) -> Optional[dict]:
    if not isinstance(rec.get("answer"), bool) or "passage" not in rec:
        return None
    return {"context": f"{rec['passage']}\nQuestion: {rec['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(rec["answer"])}


def _arc(rec: dict) -> Optional[dict]:
    ch = rec.get("choices")
    if not isinstance(ch, dict) or "answerKey" not in rec:
        return None
    texts, labels = ch.get("text"), ch.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        return None
    if rec["answerKey"] not in labels:
        return None
    return {"context": f"Question: {rec['question']}\nAnswer:", "choices": [str(t) for t in texts],
            "gold": labels.index(rec["answerKey"])}


FORMATS = {"boolq": _boolq, "arc": _arc}


def read_choice_file(path: str | Path, n: int = 0) -> tuple[str, list[dict]]:
    """(format name, items {context, choices, gold}) from a BoolQ- or ARC-style jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"multiple-choice file not found: {p} (fix the path in `choice`)")
    from lmlab.data.records import iter_jsonl

    fmt, items = None, []
    for lineno, rec in iter_jsonl(p):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise UserError(f"{p}:{lineno}: expected an object with a string 'question'")
        if fmt is None:
            fmt = next((name for name, parse in FORMATS.items() if parse(rec) is not None), None)
            if fmt is None:
                raise UserError(f"{p}:{lineno}: neither BoolQ-style (question, passage, answer: true/false) nor "
                                f"ARC-style (question, choices: {{text, label}}, answerKey); see docs/tasks.md")
        item = FORMATS[fmt](rec)
        if item is None:
            raise UserError(f"{p}:{lineno}: not a valid {fmt} record like the lines before it "
                            f"(missing or malformed fields, or answerKey not among the labels)")
        items.append(item)
        if n and len(items) >= n:
            break
    if not items:
        raise UserError(f"multiple-choice file {p} is empty")
    return fmt, items


def split_context_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: context ids (bos first), continuation ids = encode(whole)[len(encode(context)):]."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    cont = whole[len(ctx):]
    if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        ctx = [tokenizer.bos_id] + ctx
    return ctx, cont


@torch.inference_mode()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 16,
                          device=None, pad_id: int = 0) -> list[float]:
    """Summed log-probability of each continuation after its context, in batches (right-padded)."""
    device = device or next(model.parameters()).device
    ctx_len = int(model.cfg.max_seq_len)
    out: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        seqs, n_cont = [], []
        for ctx, cont in chunk:
            if not cont:
                raise UserError("a choice encodes to no tokens; multiple-choice answers must be non-empty")
            seq = (ctx + cont)[-(ctx_len + 1):]  # keep the end: the continuation and the nearest context
            seqs.append(seq)
            n_cont.append(min(len(cont), len(seq) - 1))
        T = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        y = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, :len(s) - 1] = torch.tensor(s[:-1])
            y[i, len(s) - 1 - n_cont[i]:len(s) - 1] = torch.tensor(s[len(s) - n_cont[i]:])
        scorer = getattr(model, "scorer", None)  # (lmlab.models.family.Scorer: the JAX Griffin)
        if scorer is not None:
            out.extend((-scorer.row_scores(x.numpy(), y.numpy())[0]).tolist())
            continue
        logits, _ = model(x.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        mask = y != -100
        tok_lp = logp.gather(-1, y.clamp_min(0).to(device)[..., None]).squeeze(-1) * mask.to(device)
        out.extend(tok_lp.sum(-1).tolist())
    return out


def score_choices(model, tokenizer, items: list[dict], batch_size: int = 16, device=None, n_records: int = 3) -> dict:
    """acc and acc_norm over items {context, choices, gold}; every choice of every item in one batched pass."""
    pairs, owner = [], []
    for i, it in enumerate(items):
        for c in it["choices"]:
            pairs.append(split_context_continuation(tokenizer, it["context"], " " + c))
            owner.append(i)
    was_training = model.training
    model.eval()
    lps = continuation_logprobs(model, pairs, batch_size, device, tokenizer.pad_id if tokenizer.pad_id >= 0 else 0)
    model.train(was_training)
    acc = acc_norm = 0
    records = []
    pos = 0
    for it in items:
        ll = lps[pos:pos + len(it["choices"])]
        pos += len(it["choices"])
        norm = [v / len(c) for v, c in zip(ll, it["choices"])]
        pick, pick_norm = max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=norm.__getitem__)
        acc += pick == it["gold"]
        acc_norm += pick_norm == it["gold"]
        if len(records) < n_records:
            records.append({"prompt": it["context"], "choices": it["choices"], "loglik": ll, "gold": it["gold"],
                            "completion": it["choices"][pick], "correct": pick == it["gold"]})
    return {"n": len(items), "acc": acc / len(items), "acc_norm": acc_norm / len(items), "records": records}
