"""A cross entropy fused with the output head, for every family's training loss, and the tail
of every family's forward (`lm_outputs`: logits at chosen positions, the last position, or the
loss without logits).

`LinearCrossEntropy.apply(h, w, targets, need_grad, chunk, need_grad_w, softcap)` is the mean
cross entropy of `h @ w.T` (optionally soft-capped: cap * tanh(logits / cap), as Gemma and
RecurrentGemma do) against targets (-100 ignored), without keeping the logits.

The (N, V) logits are the largest tensor in training (vocab 32768 × 1024 tokens = 134 MB in
fp32, plus as much again for log-softmax and its gradient; 1 GB per 1k tokens at Gemma's
256k vocabulary). Here they exist one chunk of rows at a time: each chunk's gradient
(softmax - onehot, times the cap's derivative 1 - tanh²) is turned into the gradients of `h`
and `w` right away, during the forward, and backward only scales them. Same FLOPs as the
plain path, a few MB of memory, and fewer passes over the logits.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def lm_outputs(x: torch.Tensor, targets: Optional[torch.Tensor], *, head: Callable, weight: torch.Tensor,
               softcap: float = 0.0, return_logits: bool = True, last_only: bool = False,
               logits_at: Optional[torch.Tensor] = None):
    """(logits or None, loss or None) from final hidden states `x` (B, T, D), as the family
    contract's forward returns them; `head(h)` is the model's output head (its `logits`),
    `weight` the head's matrix for the fused loss, `softcap` its cap (0 = none)."""
    if logits_at is not None:
        if targets is not None or last_only:
            raise ValueError("logits_at cannot be combined with targets or last_only")
        return head(x[logits_at]), None
    if last_only:
        x = x[:, -1:]
    if targets is not None and not return_logits:
        need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        h = x.reshape(-1, x.shape[-1])
        if torch.is_autocast_enabled(x.device.type):  # the matmuls run in the autocast dtype
            h = h.to(torch.get_autocast_dtype(x.device.type))
        return None, LinearCrossEntropy.apply(h, weight, targets.reshape(-1), need_grad, 256, weight.requires_grad,
                                              float(softcap or 0.0))
    logits = head(x)
    loss = None
    if targets is not None:
        # .float() is a no-op in fp32 and keeps bf16 logits from losing precision in the
        # log-sum-exp; cross_entropy's fused kernel never builds a softmax copy we keep.
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
        if not return_logits:
            logits = None
    return logits, loss


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, need_grad: bool, chunk: int, need_grad_w: bool = True, softcap: float = 0.0):
        n_valid = (targets != -100).sum().clamp_min(1)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if need_grad else None
        # A frozen head (LoRA finetuning) needs no weight gradient: skip a third of the matmuls.
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_grad and need_grad_w else None
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits = (hc @ w.t()).float()
            if softcap:  # in place where it can be: these are the largest tensors of the step
                capped = logits.mul_(1.0 / softcap).tanh_()
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            valid = tc != -100
            safe_t = tc.clamp_min(0)
            loss += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * valid).sum()
            if need_grad:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                g.mul_(valid[:, None])
                if softcap:  # d(cap·tanh(z/cap))/dz = 1 - tanh²
                    g.mul_(capped.square_().neg_().add_(1.0))
                g = g.to(hc.dtype)
                grad_h[s:s + chunk] = g @ w.to(hc.dtype)
                if grad_w is None:
                    pass
                elif hc.dtype == grad_w.dtype:
                    grad_w.addmm_(g.t(), hc)
                else:  # autocast: the product is half precision, the accumulator stays fp32
                    grad_w.add_(g.t() @ hc)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.w_dtype = w.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gw = None if grad_w is None else (grad_w * scale).to(ctx.w_dtype)
        return (grad_h * scale.to(grad_h.dtype), gw, None, None, None, None, None)
