"""Per-pixel losses: class-weighted cross-entropy plus soft Dice, and pixel-wise Hinton distillation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from visionops.tasks.segmentation.segmenter import IGNORE


def cross_entropy_dice_autograd(logits: Tensor, masks: Tensor, weight: Tensor | None = None, dice: float = 1.0) -> Tensor:
    """`PixelLoss` in plain autograd ops: its specification, which the tests hold it to, and the baseline of
    bench/bench_pixel_loss.py. Cross-entropy over the pixels not marked IGNORE, each weighted by its true
    class's `weight`, plus `dice` x soft Dice: 1 - (2 x overlap + 1) / (predicted + true pixels + 1) per
    class over the batch (Milletari et al. 2016), averaged over classes so that each counts equally, as in
    mIoU."""
    k = logits.shape[1]
    valid = masks != IGNORE
    log_probs = F.log_softmax(logits.float(), 1)
    loss = F.nll_loss(log_probs, masks.long(), weight=weight, ignore_index=IGNORE)
    if not dice:
        return loss
    target = torch.where(valid, masks.long(), 0)
    probs = log_probs.exp() * valid.unsqueeze(1)
    truth = probs.gather(1, target.unsqueeze(1)).flatten()  # each pixel's probability of its true class
    inter = probs.new_zeros(k).scatter_add(0, target.flatten(), truth)
    count = torch.bincount(target[valid], minlength=k).to(probs.dtype)
    total = probs.sum((0, 2, 3)) + count
    return loss + dice * (1 - (2 * inter + 1) / (total + 1)).mean()


class _CrossEntropyDice(torch.autograd.Function):
    """`cross_entropy_dice_autograd` with its gradient written out. Per pixel i with true class t, weight
    share a_i (its class weight over the batch's sum) and softmax p, the loss's gradient in logit c is
    a_i (p_ic - [c = t]) + dice x p_ic (g_ic - sum_k p_ik g_ik), where the soft Dice's gradient in p_ik is
    g_ik = A_k [k = t] + B_k (A_k = -2 / (K (S_k + 1)), B_k = (2 I_k + 1) / (K (S_k + 1)^2); I_k the overlap,
    S_k the predicted plus true pixels). That is a few passes over the logits where autograd makes about
    twenty (the softmax, the masking, the gather and scatter of the overlap, their backward and the float
    casts). On the preset's 16 x 11 x 64 x 64 bf16 batches (2 CPU cores, medians of 10 alternating rounds),
    forward and backward took 5.7 against 7.7 ms, and a whole training step 0.95x autograd's for `unet` and
    0.88x for `unet_small` (bench/bench_pixel_loss.py).

    With `teacher` logits it is the distillation criterion, (1 - alpha) x the above + alpha x `pixel_kd_loss`
    with the same pixel shares, whose gradient in logit c is alpha T share_i (softmax(s/T)_ic - softmax(t/T)_ic):
    both terms in one float NCHW pass and one gradient in the logits' layout, where autograd's KD term ran its
    softmaxes over channels-last and sent back a float32 gradient in another layout (bench/bench_pixel_loss.py)."""

    @staticmethod
    def forward(ctx, logits: Tensor, masks: Tensor, weight: Tensor | None, dice: float, teacher: Tensor | None = None,
                alpha: float = 0.0, temperature: float = 1.0) -> Tensor:
        n, k, h, w = logits.shape
        valid = masks != IGNORE
        ignored = not bool(valid.all())
        target = (torch.where(valid, masks, 0) if ignored else masks).long().unsqueeze(1)
        v = valid.unsqueeze(1).float()
        # one copy to float NCHW: PyTorch's log-softmax over dim 1 is fast there, and slow over channels-last
        x = logits.to(torch.float32, memory_format=torch.contiguous_format)
        p = F.log_softmax(x, 1)
        log_pt = p.gather(1, target)
        p = p.exp_()
        share = weight.take(target) if weight is not None else torch.ones_like(log_pt)
        share = share * v if ignored else share
        share = share / share.sum() if valid.any() else share
        loss = -(log_pt * share).sum()
        a = b = pt = None
        if dice:
            pt = log_pt.exp_() * v if ignored else log_pt.exp_()
            inter = pt.new_zeros(k).scatter_add_(0, target.flatten(), pt.flatten())
            count = torch.bincount(target[valid.unsqueeze(1)] if ignored else target.flatten(), minlength=k).float()
            predicted = (p.view(n, k, h * w) @ v.view(n, h * w, 1)).sum(0).view(k) if ignored else p.sum((0, 2, 3))
            denom = predicted + count + 1
            loss = loss + dice * (1 - (2 * inter + 1) / denom).mean()
            a, b = -2 * dice / (k * denom), dice * (2 * inter + 1) / (k * denom * denom)
        kd = None
        if teacher is not None:
            t = temperature
            log_qt = F.log_softmax(teacher.to(torch.float32, memory_format=torch.contiguous_format) / t, 1)
            log_qs = F.log_softmax(x / t, 1)
            qt = log_qt.exp()
            kl = (qt * (log_qt - log_qs)).sum(1, keepdim=True)
            loss = (1 - alpha) * loss + alpha * (kl * share).sum() * t * t
            kd = log_qs.exp_().sub_(qt).mul_(share * (alpha * t))
        ctx.save_for_backward(p, target, v, share, pt, a, b, kd)
        ctx.ignored, ctx.dtype, ctx.hard = ignored, logits.dtype, 1 - alpha if teacher is not None else 1.0
        ctx.layout = torch.channels_last if logits.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return loss

    @staticmethod
    def backward(ctx, g: Tensor):
        p, target, v, share, pt, a, b, kd = ctx.saved_tensors
        n, k, h, w = p.shape
        kd_g = g
        g = g * ctx.hard
        if b is None:
            grad = p * (share * g)
            at_target = -share * g
        else:
            a_pt = a.take(target) * pt
            mean_g = a_pt + (b.view(1, 1, k) @ p.view(n, k, h * w)).view(n, 1, h, w)  # sum_k p_ik g_ik
            grad = ((share - (mean_g * v if ctx.ignored else mean_g)) * g + (b * g).view(1, k, 1, 1)).mul_(p)
            grad = grad.mul_(v) if ctx.ignored else grad
            at_target = (a_pt - share) * g
        grad.scatter_add_(1, target, at_target)
        if kd is not None:
            grad.addcmul_(kd, kd_g)
        return grad.to(ctx.dtype, memory_format=ctx.layout), None, None, None, None, None, None


class PixelLoss(nn.Module):
    """`cross_entropy_dice_autograd`, computed by `_CrossEntropyDice`: pixel cross-entropy, each pixel
    weighted by its true class's `pixel_weights` (None: unweighted), plus `dice` x soft Dice; pixels marked
    IGNORE count for nothing. On the default canvases the Dice term raised test mIoU after 6 epochs from 0.63
    to 0.66 (with the earlier, full-resolution-decoder U-Net)."""

    def __init__(self, pixel_weights: list[float] | None = None, dice: float = 1.0):
        super().__init__()
        weight = torch.tensor(pixel_weights, dtype=torch.float32) if pixel_weights is not None else None
        self.register_buffer("weight", weight)
        self.dice = dice

    def forward(self, logits: Tensor, masks: Tensor) -> Tensor:
        return _CrossEntropyDice.apply(logits, masks, self.weight, self.dice)

    def distill(self, logits: Tensor, masks: Tensor, teacher: Tensor, alpha: float, temperature: float) -> Tensor:
        """(1 - alpha) x this loss + alpha x `pixel_kd_loss(logits, teacher, temperature, masks, weight)`."""
        return _CrossEntropyDice.apply(logits, masks, self.weight, self.dice, teacher, alpha, temperature)


def pixel_kd_loss(student: Tensor, teacher: Tensor, temperature: float, masks: Tensor | None = None,
                  weight: Tensor | None = None) -> Tensor:
    """Hinton et al. (2015) per pixel: KL(teacher || student) of the temperature-softened class
    distributions at each pixel, times T^2 (so its gradient keeps the hard loss's scale as T changes).
    Averaged over the pixels not marked IGNORE; with `weight` (per class, indexed by each pixel's true
    class in `masks`) a weighted average, as the hard loss's class-weighted cross-entropy. In autograd ops: the
    specification that `PixelLoss.distill` (which training uses) is held to by the tests."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student.float() / t, 1), F.log_softmax(teacher.float() / t, 1), reduction="none", log_target=True).sum(1)
    if masks is None:
        return kl.mean() * t * t
    keep = masks != IGNORE
    if not keep.any():
        return kl.new_zeros(())
    w = weight[masks[keep].long()] if weight is not None else torch.ones_like(kl[keep])
    return (kl[keep] * w).sum() / w.sum() * t * t


class PixelDistillationLoss:
    """A trainer criterion: `alpha * pixel_kd_loss(student, teacher(x), T) + (1 - alpha) * hard(student, masks)`,
    computed by `PixelLoss.distill`.

    The teacher runs frozen on the same augmented batch the student sees. Its soft targets are its logits
    before its served prior correction (`Segmenter.logit_bias`), and its pixels are weighted by the hard
    loss's class weights: the student learns what the teacher learned, under the same class balance as its
    own hard term (on the default canvases an unweighted KD term, 85% background pixels, kept the student
    at test mIoU 0.25 against 0.67 alone).
    """

    def __init__(self, hard: PixelLoss, teacher: nn.Module | None, alpha: float, temperature: float):
        if alpha > 0 and teacher is None:
            raise ValueError("a teacher is needed when alpha > 0")
        self.hard, self.teacher, self.alpha, self.temperature = hard, teacher, alpha, temperature
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def __call__(self, logits: Tensor, masks: Tensor, inputs: Tensor) -> Tensor:
        if self.alpha == 0:
            return self.hard(logits, masks)
        with torch.no_grad():
            teacher = self.teacher.uncorrected(inputs)
        return self.hard.distill(logits, masks, teacher, self.alpha, self.temperature)
