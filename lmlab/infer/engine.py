"""The generation engine: batched KV-cache decoding with greedy or sampled tokens.

    from lmlab.infer.engine import generate, generate_ids
    texts = generate(model, tokenizer, ["Once upon", "The"], max_new_tokens=50,
                     temperature=0.8, top_k=50, top_p=0.95, stop=["\\n\\n"], seed=0)
    for step in generate_ids(model, [tokenizer.encode("Hi")], max_new_tokens=20):
        print(step)                       # one new token id per row (None once a row is done)

Prompts of different lengths are left-padded into one batch; the cache masks the padding
and starts each row's RoPE positions after it, so a row decodes exactly as it would alone
(greedy batched == greedy one by one). The cache is preallocated for prompt + new tokens;
each step feeds one token per live row. Rows that finish (EOS, a stop string, or the
token budget) are dropped from the batch so they cost nothing afterwards.

Sampling: temperature 0 is greedy; otherwise logits/temperature, then top-k, then top-p
(nucleus: the smallest set of tokens whose probability reaches top_p), drawn with a
`torch.Generator` seeded by `seed`, so the same call gives the same text.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0,
                 device=None, pad_id: int = 0,
                 should_stop: Optional[Callable[[int, list[int]], bool]] = None) -> Iterator[list[Optional[int]]]:
    """Yield, per decoding step, the new token of each prompt (None for rows already done).

    A row ends after emitting `eos_id` (which is yielded), when `should_stop(row, new_ids)`
    returns True, or after `max_new_tokens`. Every prompt needs at least one token.
    """
    if not prompts or max_new_tokens <= 0:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS id)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    idx = torch.full((B, longest), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    idx = idx.to(device)
    cache = model.new_cache(B, longest + max_new_tokens, device=device, left_pad=[longest - n for n in lengths])
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    rows = list(range(B))          # original row index of each live batch slot
    new_ids: list[list[int]] = [[] for _ in range(B)]
    logits, _ = model(idx, cache=cache, last_only=True)
    for step in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        toks = nxt.tolist()
        out: list[Optional[int]] = [None] * B
        keep = []
        for slot, (row, t) in enumerate(zip(rows, toks)):
            out[row] = t
            new_ids[row].append(t)
            done = (eos_id is not None and t == eos_id) or (should_stop is not None and should_stop(row, new_ids[row]))
            if not done:
                keep.append(slot)
        yield out
        if not keep or step == max_new_tokens - 1:
            return
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            cache.select(keep)
            rows = [rows[s] for s in keep]
            nxt = nxt.index_select(0, torch.tensor(keep, device=device))
        logits, _ = model(nxt[:, None], cache=cache)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def encode_prompt(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Prompt ids: [bos] + encode(text) (as documents start in training); never empty."""
    ids = tokenizer.encode(text)
    if add_bos and tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        ids = [tokenizer.bos_id] + ids
    return ids or [tokenizer.eos_id]  # an empty prompt starts right after a document boundary


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0, device=None,
             add_bos: bool = True, on_token: Optional[Callable[[int, int], None]] = None) -> list[str]:
    """Completions (text after each prompt), cut before the first stop string; EOS ends a row.

    on_token(row, token_id) is called for every new token, e.g. to stream text as it comes.
    """
    stop = [s for s in stop if s]
    ids = [encode_prompt(tokenizer, p, add_bos) for p in prompts]
    eos = tokenizer.eos_id

    def should_stop(row: int, new: list[int]) -> bool:
        if not stop:
            return False
        # Only the tail can hold a newly completed stop string; decode enough of it.
        tail = tokenizer.decode(new[-(max(map(len, stop)) + 8):])
        return any(s in tail for s in stop)

    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id=eos, seed=seed,
                             device=device, pad_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else 0,
                             should_stop=should_stop):
        for row, t in enumerate(step):
            if t is not None and t != eos:
                outs[row].append(t)
                if on_token is not None:
                    on_token(row, t)
    return [_cut_at_stop(tokenizer.decode(o), stop)[0] for o in outs]
