"""Direct preference optimisation's losses as pure functions, on the same [B, K] layout as the reward model's
ranking loss: one batch element per prompt, its K ranked responses side by side (K = 2 for chosen/rejected
pairs, InstructGPT's 4..9 for K-way rankings), `valid` marking the responses that exist.

Every loss scores a response by its implicit reward beta * z, where z is the policy's log-prob of the
response minus the reference's (`sequence_logps` sums or averages the token log-probs):

    sigmoid   (DPO, Rafailov et al. 2023) over every ranked pair (w better than l) of a prompt:
              -(1 - eps) log sigmoid(beta (z_w - z_l)) - eps log sigmoid(-beta (z_w - z_l))
              (eps = label_smoothing: cDPO's labels flipped with probability eps)
    ipo       (Azar et al. 2023) over every ranked pair: (z_w - z_l - 1 / (2 beta))^2
    listwise  the Plackett-Luce likelihood of the whole ranking (DPO's Bradley-Terry generalised to K, as in
              the DPO paper's appendix A.3): with the responses in the labeler's order pi (best first),
              -1/(K-1) sum_{j=0}^{K-2} [beta z_pi(j) - logsumexp_{m >= j} beta z_pi(m)]
              (per choice; K = 2 is exactly the sigmoid loss)

Pairwise losses average over a prompt's pairs, so every prompt counts once however large its K (the
reward model's rule); the batch loss is the mean over prompts with at least one pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .stats import masked_sum

PREFERENCE_LOSSES = ("sigmoid", "ipo", "listwise")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, length_norm: bool = False) -> torch.Tensor:
    """Each sequence's log-prob from its tokens': token_logps [N, T], mask [N, T] -> [N], the sum over the
    valid tokens, or with length_norm their mean (SimPO's and TRL's IPO's normalisation)."""
    total = masked_sum(token_logps, mask, dim=1)
    if not length_norm:
        return total
    return total / (mask != 0).sum(dim=1).clamp(min=1).to(total.dtype)


def _check(logratios, ranks, valid, loss: str, beta: float, label_smoothing: float) -> None:
    if loss not in PREFERENCE_LOSSES:
        raise ValueError(f"`loss` must be one of {', '.join(PREFERENCE_LOSSES)}, got {loss!r}")
    if logratios.dim() != 2 or logratios.shape != ranks.shape or logratios.shape != valid.shape:
        raise ValueError(f"`logratios`, `ranks` and `valid` must all have shape [B, K]; got "
                         f"{tuple(logratios.shape)}, {tuple(ranks.shape)}, {tuple(valid.shape)}")
    if not logratios.is_floating_point():
        raise ValueError(f"`logratios` must be a floating-point tensor, got {logratios.dtype}")
    if not beta > 0:
        raise ValueError(f"`beta` must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"`label_smoothing` must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss != "sigmoid":
        raise ValueError(f"`label_smoothing` (cDPO) flips a pair's label: it is defined for the sigmoid loss, not "
                         f"{loss!r}; set it to 0")


def preference_loss(logratios: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor, *, loss: str = "sigmoid",
                    beta: float = 0.1, label_smoothing: float = 0.0):
    """DPO-family loss of a batch of rankings (see the module's docstring for each formula).

    logratios [B, K] float: z, the policy's sequence log-prob minus the reference's (the policy's alone for
    the reference-free variant); ranks [B, K] int, 0 = best; valid [B, K] bool. Returns (loss, stats) with
    stats "accuracy" (the fraction of ranked pairs the implicit rewards order like the labeler) and
    "margin" (the mean over those pairs of beta (z_w - z_l)).
    """
    _check(logratios, ranks, valid, loss, beta, label_smoothing)
    v = valid.bool()
    z = torch.where(v, logratios, torch.zeros((), dtype=logratios.dtype, device=logratios.device))
    diff = z[:, :, None] - z[:, None, :]                                        # [B, K, K]: z_i - z_j
    better = (ranks[:, :, None] < ranks[:, None, :]) & v[:, :, None] & v[:, None, :]
    n_pairs = better.sum(dim=(1, 2))
    has = n_pairs > 0
    if loss == "listwise":
        per_prompt = _plackett_luce_nll(beta * z, ranks, v)
    else:
        if loss == "sigmoid":
            pair = -(1 - label_smoothing) * F.logsigmoid(beta * diff) - label_smoothing * F.logsigmoid(-beta * diff)
        else:
            pair = (diff - 1.0 / (2.0 * beta)) ** 2
        per_prompt = torch.where(better, pair, 0.0).sum(dim=(1, 2)) / n_pairs.clamp(min=1)
    out = per_prompt[has].mean() if has.any() else logratios.sum() * 0.0
    with torch.no_grad():
        pairs = better.sum().clamp(min=1)
        stats = {"accuracy": ((diff > 0) & better).sum().item() / pairs.item(),
                 "margin": (beta * torch.where(better, diff, 0.0)).sum().item() / pairs.item()}
    return out, stats


def _plackett_luce_nll(scores: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per prompt: the negative log-likelihood of its ranking under Plackett-Luce with `scores` [B, K],
    divided by its number of choices (K - 1); 0 for a prompt with fewer than two responses."""
    big = torch.iinfo(torch.long).max
    order = torch.argsort(torch.where(valid, ranks.long(), big), dim=1, stable=True)  # best first, missing last
    s = scores.gather(1, order)
    ok = valid.gather(1, order)
    s_inf = torch.where(ok, s, float("-inf"))
    rest = torch.logcumsumexp(s_inf.flip(1), dim=1).flip(1)   # logsumexp over this response and every worse one
    step = torch.where(ok, s - torch.where(ok, rest, 0.0), 0.0)  # log P(this one is chosen next); last one: 0
    choices = (ok.sum(dim=1) - 1).clamp(min=1)
    return -step.sum(dim=1) / choices.to(scores.dtype)
