"""Generation with the JAX Griffin: lmlab's decoding contract (lmlab.infer.engine.generate_ids)
run by Google DeepMind's `recurrentgemma.jax` model, one compiled program per batch shape.

    model.decoder = Decoder.of(model)     # a torch Griffin: lmlab.infer.engine now decodes it in JAX
    engine.complete_ids(model, tokenizer, prompts, Sampling(max_new_tokens=256))

lmlab.infer.backend.load_for_decoding(run, "jax") loads a run that way (its scorer too).

`lmlab eval RUN backend=jax` does this, so sample prompts, generative problems and the Lean
proof evaluation generate with the JAX model; so do `lmlab generate` and `lmlab chat` with
backend=jax (docs/jax.md).

How a batch decodes:
- prompts are left-padded to a length bucket (a power of two), padding at segment position -1
  as the reference's sampler does, and the batch padded with idle rows to a power of two (and a
  multiple of the device count), so a few programs serve a whole evaluation (and the number of
  new tokens is not part of a program's shape);
- prefill: all but the last prompt token through the model's forward, which keeps padding out
  of the recurrence, the convolution and attention, keeping the cache; the convolution's state
  is then zeroed where it holds padding. The reference's own sampler carries it, which changes
  the first steps of a prompt shorter than the convolution (4 tokens);
- then a `lax.while_loop` feeds the last token, samples the next one and feeds it back, `chunk`
  steps per call (32; the cache stays on the devices between calls) or until every row is done.
  Between chunks the host yields the steps, checks stop strings and marks the rows that ended
  there, so a stream shows its tokens a chunk at a time and a stopped batch costs nothing more.

The rows are split over every local device (one `data` axis; the parameters are replicated).
Sampling follows lmlab.infer.sampling: temperature 0 is greedy, else logits / temperature,
then top-k, then top-p (the first token always stays), drawn with JAX's PRNG from the seed.
Greedy decoding gives the torch engine's tokens (tests/test_jax_griffin_decode.py); sampled
tokens follow the same distribution, not the same draws.

Scoring (the model's `scorer`) is lmlab.jax_backend.griffin.score, on this decoder's parameters.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from lmlab.errors import UserError
from lmlab.jax_backend.griffin.model import build, reference_config, require_recurrentgemma
from lmlab.models.griffin.config import GriffinConfig

MIN_BUCKET = 8


def bucket(n: int, multiple: int = 1) -> int:
    """The padded size for n: the next power of two (at least MIN_BUCKET), rounded up to `multiple`."""
    size = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-size // multiple) * multiple


def decode_dtype(platform: str):
    """The compute dtype: bfloat16 on TPUs and GPUs, float32 (None) on CPUs; parameters stay float32."""
    import jax.numpy as jnp

    from lmlab.jax_backend import compute_dtype

    return jnp.bfloat16 if compute_dtype("auto", platform) == "bfloat16" else None


def check(family: str, cfg, where) -> None:
    """What backend=jax decodes: a Griffin whose settings the reference runs, recurrentgemma installed
    (a UserError naming the fix otherwise)."""
    if family != "griffin":
        raise UserError(f"backend=jax decodes with the JAX Griffin; {where} is a {family} model: use backend=torch")
    require_recurrentgemma()
    reference_config(cfg)


class Decoder:
    """A Griffin's parameters on the local devices and its compiled decoding programs."""

    def __init__(self, cfg: GriffinConfig, params: dict, dtype=None, chunk: int = 32) -> None:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from lmlab.jax_backend import enable_compile_cache
        from lmlab.jax_backend.mesh import place

        enable_compile_cache()
        self.cfg = cfg
        self.net = build(cfg, dtype=dtype)
        self.devices = jax.local_devices()
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
        self.rows = NamedSharding(self.mesh, P("data"))
        self.params = place(params, jax.tree_util.tree_map(lambda _: NamedSharding(self.mesh, P()), params))
        self.chunk = chunk
        self._prefill = self._prefill_program()
        self._programs: dict = {}  # (sampled, top-k on, top-p on) -> the chunk program

    @classmethod
    def of(cls, model, dtype="auto", chunk: int = 32) -> "Decoder":
        """The decoder of a torch Griffin's weights (dtype "auto": decode_dtype of the platform;
        `chunk`: decoding steps per call to the devices, the tokens a stream shows at a time)."""
        import jax

        from lmlab.jax_backend.griffin.convert import from_torch_state

        if dtype == "auto":
            dtype = decode_dtype(jax.local_devices()[0].platform)
        return cls(model.cfg, from_torch_state(model.state_dict(), model.cfg), dtype, chunk)

    # ------------------------------------------------------------------ the engine's contract

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0,
                     pad_id: int = 0, should_stop: Optional[Callable[[int, list[int]], bool]] = None,
                     ) -> Iterator[list[Optional[int]]]:
        """As lmlab.infer.engine.generate_ids: per decoding step, each row's new token (None once done).

        The devices decode `chunk` steps at a time; between chunks the steps are yielded here, so
        a row ends at eos, at `should_stop(row, new_ids)` or after `max_new_tokens`, as there.
        The rows that ended on the host are marked done on the devices for the next chunk, and
        closing the generator (a caller that has seen enough) decodes nothing more.
        """
        if not prompts or max_new_tokens <= 0:
            return
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (e.g. the BOS id)")
        n = len(prompts)
        new_ids: list[list[int]] = [[] for _ in prompts]
        live = set(range(n))
        run = self._start(prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed, pad_id)
        while live:
            block = run(sorted(set(range(n)) - live))
            if block is None:  # the budget is spent, or every row is done on the devices
                return
            for col in range(block.shape[1]):
                out: list[Optional[int]] = [None] * n
                for row in sorted(live):
                    t = int(block[row, col])
                    out[row] = t
                    new_ids[row].append(t)
                    if (eos_id is not None and t == eos_id) or (should_stop is not None
                                                                and should_stop(row, new_ids[row])):
                        live.discard(row)
                yield out
                if not live:
                    return

    def decode(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, eos_id: Optional[int] = None, seed: int = 0,
               pad_id: int = 0) -> np.ndarray:
        """(len(prompts), max_new_tokens) new token ids; after a row's eos, `pad_id`."""
        run = self._start(prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed, pad_id)
        blocks = []
        while (block := run([])) is not None:
            blocks.append(block)
        out = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
        if blocks:
            got = np.concatenate(blocks, axis=1)
            out[:, :got.shape[1]] = got
        return out

    def put(self, a: np.ndarray):
        """A host array split by rows over the local devices."""
        import jax

        return jax.device_put(a, self.rows)

    # ------------------------------------------------------------------ the compiled programs

    def _start(self, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, seed, pad_id):
        """Prefill a batch; -> `run(ended_rows)`, which decodes the next chunk of steps and returns
        its tokens ((len(prompts), k) with k <= chunk), or None once nothing is left to decode."""
        import jax

        n = len(prompts)
        rows, width = bucket(n, len(self.devices)), bucket(max(len(p) for p in prompts))
        tokens = np.full((rows, width), pad_id, np.int32)
        pos = np.full((rows, width), -1, np.int32)
        for i in range(rows):
            p = list(prompts[i]) if i < n else [pad_id]  # idle rows: one token, done from the start
            tokens[i, width - len(p):] = p
            pos[i, width - len(p):] = np.arange(len(p))
        sampled = temperature > 0
        flags = (sampled, sampled and 0 < top_k < self.cfg.vocab_size, sampled and top_p < 1.0)
        if flags not in self._programs:
            self._programs[flags] = self._chunk_program(*flags)
        chunk = self._programs[flags]
        put = self.put
        state = self._prefill(self.params, put(tokens), put(pos), put(np.arange(rows) >= n), jax.random.key(seed))
        knobs = (np.float32(temperature), np.int32(top_k), np.float32(top_p),
                 np.int32(-1 if eos_id is None else eos_id), np.int32(pad_id))
        left = max_new_tokens

        def run(ended: list[int]):
            nonlocal state, left
            if left <= 0:
                return None
            ended_mask = np.zeros(rows, bool)
            ended_mask[list(ended)] = True
            state, buf, steps = chunk(self.params, state, put(ended_mask), np.int32(min(left, self.chunk)), *knobs)
            steps = int(steps)
            left -= steps
            if steps == 0:  # every row had ended
                left = 0
                return None
            return np.asarray(buf)[:n, :steps]

        return run

    def _prefill_program(self):
        """All but the last prompt token through the forward pass, keeping the cache: the state the
        chunks carry (last token, its position, cache, rows done, PRNG key)."""
        import jax

        net = self.net

        def prefill(params, tokens, pos, idle, key):
            _, cache = net.apply(params, tokens[:, :-1], pos[:, :-1], return_logits=False, return_cache=True)
            return tokens[:, -1], pos[:, -1], _zero_padded_conv_states(cache, pos[:, :-1]), idle, key

        return jax.jit(prefill)

    def _chunk_program(self, sampled: bool, use_top_k: bool, use_top_p: bool):
        """Up to `limit` (at most self.chunk) decoding steps in one `lax.while_loop`, which stops
        early once every row is done; -> (the state, (rows, chunk) tokens, the steps taken)."""
        import jax
        import jax.numpy as jnp

        net, size = self.net, self.chunk

        def pick(logits, temperature, top_k, top_p, key):
            x = logits.astype(jnp.float32)
            if not sampled:
                return jnp.argmax(x, axis=-1).astype(jnp.int32)
            x = x / temperature
            if use_top_k:  # keep logits >= the k-th largest (ties kept, as torch's masked_fill)
                kth = jnp.take(jnp.sort(x, axis=-1)[:, ::-1], top_k - 1, axis=-1)
                x = jnp.where(x < kth[:, None], -jnp.inf, x)
            if use_top_p:  # keep the smallest prefix of the sorted tokens whose mass reaches top_p
                s = jnp.sort(x, axis=-1)[:, ::-1]
                p = jax.nn.softmax(s, axis=-1)
                keep = (jnp.cumsum(p, axis=-1) - p) < top_p  # the first is always kept
                cutoff = jnp.min(jnp.where(keep, s, jnp.inf), axis=-1)
                x = jnp.where(x < cutoff[:, None], -jnp.inf, x)
            return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)

        def run(params, state, ended, limit, temperature, top_k, top_p, eos, pad):
            last, at, cache, done, key = state
            done = done | ended

            def cond(s):
                step, _, _, _, _, done, _ = s
                return (step < limit) & ~jnp.all(done)

            def body(s):
                step, buf, last, at, cache, done, key = s
                logits, cache = net.apply(params, last[:, None], at[:, None], cache=cache, return_cache=True)
                key, sub = jax.random.split(key)
                tok = jnp.where(done, pad, pick(logits[:, 0], temperature, top_k, top_p, sub))
                buf = buf.at[:, step].set(tok)
                return step + 1, buf, tok, at + 1, cache, done | (tok == eos), key

            start = (jnp.int32(0), jnp.full((last.shape[0], size), pad, jnp.int32), last, at, cache, done, key)
            steps, buf, last, at, cache, done, key = jax.lax.while_loop(cond, body, start)
            return (last, at, cache, done, key), buf, steps

        return jax.jit(run)


def _zero_padded_conv_states(cache: dict, pos):
    """The prefill cache with each recurrent block's convolution state zeroed at padding (pos < 0):
    the forward pass never lets padding into the convolution, so the next steps must not either."""
    out = {}
    for name, c in cache.items():
        if hasattr(c, "conv1d_state"):
            width = c.conv1d_state.shape[1]
            real = (pos[:, -width:] >= 0)[:, :, None].astype(c.conv1d_state.dtype)
            c = c._replace(conv1d_state=c.conv1d_state * real)
        out[name] = c
    return out


__all__ = ["Decoder", "bucket", "check", "decode_dtype"]
