"""The generation engine: batched KV-cache decoding with greedy or sampled tokens.

    from lmlab.infer.engine import complete, generate, generate_ids
    texts = generate(model, tokenizer, ["Once upon", "The"], max_new_tokens=50,
                     temperature=0.8, top_k=50, top_p=0.95, stop=["\\n\\n"], seed=0)
    for step in generate_ids(model, [tokenizer.encode("Hi")], max_new_tokens=20):
        print(step)                       # one new token id per row (None once a row is done)
    texts = complete(model, tokenizer, [ids], Sampling(max_new_tokens=128), chat_stops("chatml", tokenizer))

Prompts of different lengths are left-padded into one batch; the cache masks the padding
and starts each row's RoPE positions after it, so a row decodes exactly as it would alone
(greedy batched == greedy one by one). The cache is preallocated for prompt + new tokens;
each step feeds one token per live row. Rows that finish (EOS, a stop string, or the
token budget) are dropped from the batch so they cost nothing afterwards.

`generate` takes text prompts; `complete` takes token-id prompts (chat prompts, from
lmlab.infer.prompting) with a `Sampling` and `Stops`, batching them by length. Both stop a
row as soon as its text holds a stop string and cut the text there (prompting's
`stop_checker` and `truncate_at_stop`, the rules every verb shares). The sampling step itself
is lmlab.infer.sampling's `sample_next`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from lmlab.infer.prompting import Stops, stop_checker, truncate_at_stop
from lmlab.infer.sampling import Sampling, sample_next  # noqa: F401  (sample_next: part of this module's API)

# (positions in the prompt, values (k, D)): input vectors that replace those positions' embeddings
PromptVectors = tuple[Sequence[int], torch.Tensor]


@torch.inference_mode()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0,
                 device=None, pad_id: int = 0,
                 should_stop: Optional[Callable[[int, list[int]], bool]] = None,
                 sinks: Optional[int] = None,
                 vectors: Optional[Sequence[Optional[PromptVectors]]] = None) -> Iterator[list[Optional[int]]]:
    """Yield, per decoding step, the new token of each prompt (None for rows already done).

    A row ends after emitting `eos_id` (which is yielded), when `should_stop(row, new_ids)`
    returns True, or after `max_new_tokens`. Every prompt needs at least one token.
    `sinks=k`: when prompt + new tokens outgrow a bounded model context (the transformer's
    max_seq_len), stream past it with attention sinks: the cache keeps each row's first k
    tokens and the most recent ones (lmlab.models.kv_cache); the prompt is prefilled in chunks.
    `vectors[i] = (positions, values (k, D))`: input vectors in place of prompt i's embeddings at
    those positions of the prompt (LLM-TRM's latent thinking; the model must take `vectors=`).
    """
    if not prompts or max_new_tokens <= 0:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS id)")
    decoder = getattr(model, "decoder", None)
    if decoder is not None:  # the model decodes elsewhere (lmlab.models.family.Decoder: the JAX Griffin);
        # sinks only matter past a bounded context, which the Griffin does not have
        if vectors is not None or (sinks is not None and getattr(model, "max_context", None) is not None):
            raise ValueError("a model's own decoder takes neither input vectors nor attention sinks")
        yield from decoder.generate_ids(prompts, max_new_tokens, temperature, top_k, top_p, eos_id=eos_id, seed=seed,
                                        pad_id=pad_id, should_stop=should_stop)
        return
    device = torch.device(device) if device is not None else next(model.parameters()).device
    B = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    idx = torch.full((B, longest), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    idx = idx.to(device)
    pads = [longest - n for n in lengths]
    ctx = getattr(model, "max_context", None)
    streaming = sinks is not None and ctx is not None and longest + max_new_tokens > ctx
    if streaming:
        cache = model.new_cache(B, ctx, device=device, left_pad=pads, sinks=sinks)
    else:
        cache = model.new_cache(B, longest + max_new_tokens, device=device, left_pad=pads)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    rows = list(range(B))          # original row index of each live batch slot
    new_ids: list[list[int]] = [[] for _ in range(B)]
    # sink mode: a chunk must fit beside the sinks; half the room leaves each chunk at least
    # half a window of the text before it
    chunk = max(1, (ctx - sinks) // 2) if streaming else longest
    spliced = _spliced(vectors, pads, longest, device) if vectors is not None and any(
        v is not None for v in vectors) else None
    if spliced is not None and streaming:
        raise ValueError("input vectors cannot be combined with streaming past the context (sinks)")
    for start in range(0, longest, chunk):
        extra = {"vectors": spliced} if spliced is not None else {}
        logits, _ = model(idx[:, start:start + chunk], cache=cache, last_only=True, **extra)
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


def _spliced(vectors: Sequence[Optional[PromptVectors]], pads: list[int], width: int, device):
    """The (mask, values) of per-prompt vectors on the left-padded batch layout."""
    mask = torch.zeros(len(pads), width, dtype=torch.bool)
    values = []
    for i, v in enumerate(vectors):
        if v is None:
            continue
        positions, vals = v
        order = sorted(range(len(positions)), key=lambda j: positions[j])  # row-major: by position
        if len(positions) != len(vals) or len(set(positions)) != len(positions):
            raise ValueError(f"prompt {i}: {len(positions)} positions for {len(vals)} vectors (each position once)")
        mask[i, [pads[i] + positions[j] for j in order]] = True
        values.append(vals[order])
    return mask.to(device), torch.cat(values).to(device)


def encode_prompt(tokenizer, text: str, add_bos: bool = True) -> list[int]:
    """Prompt ids: [bos] + encode(text) (as documents start in training); never empty."""
    ids = tokenizer.encode(text)
    if add_bos and tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
        ids = [tokenizer.bos_id] + ids
    return ids or [tokenizer.eos_id]  # an empty prompt starts right after a document boundary


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] = (), seed: int = 0, device=None,
             add_bos: bool = True, on_token: Optional[Callable[[int, int], None]] = None,
             sinks: Optional[int] = None) -> list[str]:
    """Completions (text after each prompt), cut before the first stop string; EOS ends a row.

    on_token(row, token_id) is called for every new token, e.g. to stream text as it comes.
    sinks: as generate_ids (streaming past the model's context).
    """
    stops = Stops(tuple(stop))
    ids = [encode_prompt(tokenizer, p, add_bos) for p in prompts]
    eos = tokenizer.eos_id
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, eos_id=eos, seed=seed,
                             device=device, pad_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else 0,
                             should_stop=stop_checker(tokenizer, stops, len(ids)), sinks=sinks):
        for row, t in enumerate(step):
            if t is not None and t != eos:
                outs[row].append(t)
                if on_token is not None:
                    on_token(row, t)
    return [truncate_at_stop(tokenizer.decode(o), stops.strings)[0] for o in outs]


@dataclass
class Completion:
    """One completion of `complete_ids`: what was sampled and how it ended."""
    ids: list[int]        # every sampled token, the ending one included (eos, a stop id, a stop string's last)
    text: str             # the decoded reply, cut before the first stop string (no ending token)
    finished: bool        # ended by eos, a stop id or a stop string; False: cut at max_new_tokens


def complete_ids(model, tokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling, stops: Stops = Stops(),
                 batch_size: int = 32, device=None, bar=None,
                 vectors: Optional[Sequence[Optional[PromptVectors]]] = None) -> list[Completion]:
    """Completions of token-id prompts with their sampled ids (RL trains on exactly these tokens).

    Prompts are decoded in batches of similar length (little padding); batch b samples with
    seed `sampling.seed + b`, so the samples of one prompt repeated differ and a run repeats.
    `bar` (a progress bar) advances by each batch's prompts. `vectors` as in `generate_ids`, one
    entry per prompt.
    """
    eos = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else None
    ends = set(stops.ids) | ({eos} if eos is not None else set())
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[Optional[Completion]] = [None] * len(prompts)
    for b, start in enumerate(range(0, len(order), batch_size)):
        rows = order[start:start + batch_size]
        new: list[list[int]] = [[] for _ in rows]
        checker = stop_checker(tokenizer, stops, len(rows))
        stopped = [False] * len(rows)

        def should_stop(r: int, ids: list[int]) -> bool:
            stopped[r] = checker is not None and checker(r, ids)
            return stopped[r]

        for step in generate_ids(model, [prompts[i] for i in rows], sampling.max_new_tokens, sampling.temperature,
                                 sampling.top_k, sampling.top_p, eos_id=eos, seed=sampling.seed + b, device=device,
                                 pad_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else 0, should_stop=should_stop,
                                 vectors=[vectors[i] for i in rows] if vectors is not None else None):
            for r, t in enumerate(step):
                if t is not None:
                    new[r].append(t)
        for r, i in enumerate(rows):
            ids = new[r]
            ended = bool(ids) and (ids[-1] in ends or stopped[r])
            body = ids[:-1] if ended and ids[-1] in ends else ids
            outs[i] = Completion(ids, truncate_at_stop(tokenizer.decode(body), stops.strings)[0], ended)
        if bar is not None:
            bar.update(len(rows))
    return outs  # type: ignore[return-value]


def complete(model, tokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling, stops: Stops = Stops(),
             batch_size: int = 32, device=None, bar=None) -> list[str]:
    """Completions of token-id prompts (e.g. chat prompts) as text, cut at the first stop string or stop id."""
    return [c.text for c in complete_ids(model, tokenizer, prompts, sampling, stops, batch_size, device, bar)]
