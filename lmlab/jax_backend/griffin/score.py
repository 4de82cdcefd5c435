"""Scoring with the JAX Griffin: lmlab.models.family.Scorer run by Google DeepMind's
`recurrentgemma.jax` model, on the parameters a decoder (lmlab.jax_backend.griffin.decode) placed.

    model.scorer = Scorer(Decoder.of(model))    # lmlab.eval now scores a torch Griffin in JAX

lmlab.infer.backend.load_for_decoding(run, "jax") loads a run that way (its decoder too).

Two kinds of program:
- `row_scores`: each row's summed loss and whether every target is the greedy token, one
  forward pass per batch (perplexity of packed data and texts, multiple choice, lm-eval's
  log-likelihoods). The batch is right-padded to a bucket (power-of-two rows and length, as
  decoding pads), so a few compiled programs serve a whole evaluation; the rows are split
  over the local devices; the cross-entropy is computed in float32.
- `stream_nll`: one text of any length in constant memory (the eval's long_context): the first
  attention window through the forward pass, keeping the cache, then a token per step through
  the cache as decoding does (the reference's convolution takes one token at a time once it
  has a cache), a window of steps per call in one `lax.scan`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lmlab.jax_backend.griffin.decode import Decoder, bucket

IGNORE = -100  # a target not scored (lmlab.eval.perplexity.IGNORE)


class Scorer:
    """A decoder's parameters and mesh, and the compiled scoring programs."""

    def __init__(self, decoder: Decoder) -> None:
        self.cfg, self.net, self.params, self.mesh = decoder.cfg, decoder.net, decoder.params, decoder.mesh
        self.devices, self.put = decoder.devices, decoder.put
        self._rows = None  # per-row sums and greedy flags (jit compiles one per bucket)
        self._stream = None  # the two programs of stream_nll

    def row_scores(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """lmlab.models.family.Scorer: for (B, T) token ids x and targets y (IGNORE, -100: not
        scored), each row's sum of -log p(y | x) in nats ((B,) float64) and whether every scored
        target is the greedy token ((B,) bool). The batch is right-padded to a bucket (padding
        comes after every real token, so the causal model never reads it) and scored in one
        compiled program per bucket, the cross-entropy in float32."""
        n, t = x.shape
        rows, width = bucket(n, len(self.devices)), bucket(t)
        xs = np.zeros((rows, width), np.int32)
        ys = np.full((rows, width), IGNORE, np.int32)
        xs[:n, :t], ys[:n, :t] = x, y
        pos = np.ascontiguousarray(np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width)))
        if self._rows is None:
            self._rows = self._rows_program()
        nll, greedy = self._rows(self.params, self.put(xs), self.put(pos), self.put(ys))
        return np.asarray(nll, np.float64)[:n], np.asarray(greedy, bool)[:n]

    def stream_nll(self, ids: Sequence[int]) -> np.ndarray:
        """lmlab.models.family.Scorer: -log p(ids[t+1] | ids[:t+1]) for every t, one stream of any
        length in constant memory (float64, len(ids) - 1).

        The first attention window goes through the forward pass, keeping the cache; the rest is
        fed one token per step through the cache, as decoding does (the reference's convolution
        takes a single token when it has a cache), a window of steps per call in one `lax.scan`,
        the last call padded at the end. Two compiled programs, whatever the length."""
        ids = np.asarray(ids, np.int32)
        if len(ids) < 2:
            return np.zeros(0, np.float64)
        if self._stream is None:
            self._stream = self._stream_programs()
        first, rest = self._stream
        size = int(self.cfg.attention_window_size)
        out, cache = [], None
        for s in range(0, len(ids) - 1, size):
            x = np.zeros((1, size), np.int32)
            y = np.full((1, size), IGNORE, np.int32)
            k = min(size, len(ids) - 1 - s)
            x[0, :k], y[0, :k] = ids[s:s + k], ids[s + 1:s + 1 + k]
            pos = np.arange(s, s + size, dtype=np.int32)[None]
            nll, cache = first(self.params, x, pos, y) if cache is None else rest(self.params, x, pos, y, cache)
            out.append(np.asarray(nll, np.float64)[0, :k])
        return np.concatenate(out)

    # ------------------------------------------------------------------ the compiled programs

    def _rows_program(self):
        import jax
        import jax.numpy as jnp

        net = self.net

        def scores(params, tokens, pos, targets):
            logits, _ = net.apply(params, tokens, pos, return_cache=False)
            keep = targets != IGNORE
            nll = jnp.where(keep, _token_nll(logits, targets), 0.0)
            hit = (jnp.argmax(logits, axis=-1) == targets) | ~keep
            return jnp.sum(nll, axis=-1), jnp.all(hit, axis=-1)

        return jax.jit(scores)

    def _stream_programs(self):
        """(first, rest): a window of a stream through the forward pass (no cache yet), and a window
        fed a token at a time through the cache; one row, replicated on the devices."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        net = self.net
        same = NamedSharding(self.mesh, P())

        def first(params, tokens, pos, targets):
            logits, cache = net.apply(params, tokens, pos, return_cache=True)
            return _token_nll(logits, targets), cache

        def rest(params, tokens, pos, targets, cache):
            def step(cache, col):
                tok, at, target = col
                logits, cache = net.apply(params, tok[:, None], at[:, None], cache=cache, return_cache=True)
                return cache, _token_nll(logits[:, 0], target)

            cache, nll = jax.lax.scan(step, cache, (tokens.T, pos.T, targets.T))
            return nll.T, cache

        return jax.jit(first, out_shardings=same), jax.jit(rest, out_shardings=same)


def _token_nll(logits, targets):
    """-log softmax(logits)[target] per position in float32 (a target of IGNORE scores token 0:
    the callers mask it)."""
    import jax
    import jax.numpy as jnp

    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


__all__ = ["IGNORE", "Scorer"]
