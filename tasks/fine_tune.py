"""The torch fine-tuning loop of ``tasks.train``: batches of distinct intents, AdamW with a linear
warm-up and decay, and the joint loss (cosine-head cross-entropy + MultipleNegativesRankingLoss).

torch is imported inside the functions only; the hyperparameters are ``tasks.train.TrainConfig``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.pairs import Pair

if TYPE_CHECKING:
    import torch

    from tasks.train import TrainConfig

logger = logging.getLogger(__name__)

_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")


def distinct_label_batches(
    pairs: Sequence[Pair], batch_size: int, rng: random.Random
) -> list[list[Pair]]:
    """Shuffle ``pairs`` into batches where no two pairs share a label (a batch is cut short
    when fewer labels are left than ``batch_size``)."""
    pending = list(pairs)
    rng.shuffle(pending)
    batches: list[list[Pair]] = []
    while pending:
        batch: list[Pair] = []
        used: set[str] = set()
        rest: list[Pair] = []
        for pair in pending:
            if len(batch) < batch_size and pair.label not in used:
                batch.append(pair)
                used.add(pair.label)
            else:
                rest.append(pair)
        batches.append(batch)
        pending = rest
    return batches


def epoch_batches(
    pairs: Sequence[Pair], config: TrainConfig, steps: int, seed: int
) -> list[list[Pair]]:
    """``steps`` batches, reshuffling the pairs each pass."""
    rng = random.Random(seed)
    out: list[list[Pair]] = []
    while len(out) < steps:
        # Cheap greedy packing; full batches first (the short tail batches go last).
        epoch = distinct_label_batches(pairs, config.batch_size, rng)
        epoch.sort(key=len, reverse=True)
        full = [b for b in epoch if len(b) >= min(config.batch_size, 2)]
        if not full:
            raise ValueError("cannot form a batch of two pairs: need at least two intents")
        rng.shuffle(full)
        out.extend(full)
    return out[:steps]


def plan_steps(n_pairs: int, config: TrainConfig) -> int:
    """Optimiser steps: ``epochs`` passes over the pairs, at least ``min_steps``, at most
    ``max_steps``."""
    per_epoch = math.ceil(n_pairs / config.batch_size)
    steps = max(config.min_steps, math.ceil(per_epoch * config.epochs))
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    return max(steps, 1)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def format_eta(seconds: float) -> str:
    """``seconds`` as ``<minutes>m<seconds>s``."""
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _optimizer(
    encoder: Any, head: torch.nn.Parameter, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases and layer norms; the head at its own learning rate) and
    a linear warm-up over ``warmup_ratio`` of the steps, then a linear decay to 0."""
    import torch

    named = list(encoder.named_parameters())
    groups = [
        {
            "params": [p for n, p in named if not any(k in n for k in _NO_DECAY)],
            "weight_decay": config.weight_decay,
            "lr": config.learning_rate,
        },
        {
            "params": [p for n, p in named if any(k in n for k in _NO_DECAY)],
            "weight_decay": 0.0,
            "lr": config.learning_rate,
        },
        {"params": [head], "weight_decay": 0.0, "lr": config.head_learning_rate},
    ]
    optimizer = torch.optim.AdamW(groups)
    warmup = max(1, int(steps * config.warmup_ratio))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _batch_loss(
    encoder: Any,
    head: torch.nn.Parameter,
    batch: Sequence[Pair],
    *,
    label_index: dict[str, int],
    config: TrainConfig,
    oos_label: str,
) -> torch.Tensor:
    """The loss of one batch: cross-entropy of anchors and positives against the cosine head
    (``ce``) plus in-batch-negatives ranking of anchors against positives (``mnrl``, in-scope
    pairs only; hard negatives join the candidates when every pair has one)."""
    import torch
    import torch.nn.functional as F

    use_ce = config.loss in ("ce", "ce+mnrl")
    use_mnrl = config.loss in ("mnrl", "ce+mnrl")
    texts = [p.anchor for p in batch] + [p.positive for p in batch]
    with_neg = use_mnrl and all(p.negative is not None for p in batch)
    if with_neg:
        texts += [str(p.negative) for p in batch]
    features = encoder.preprocess(texts)
    emb = F.normalize(encoder(features)["sentence_embedding"], dim=-1)
    m = len(batch)
    loss = torch.zeros(())
    if use_ce:
        targets = torch.tensor([label_index[p.label] for p in batch] * 2)
        logits = config.scale * emb[: 2 * m] @ F.normalize(head, dim=-1).T
        loss = loss + F.cross_entropy(logits, targets)
    if use_mnrl:
        keep = torch.tensor([p.label != oos_label for p in batch])
        if int(keep.sum()) >= 2:
            anchors = emb[:m][keep]
            candidates = emb[m : 2 * m][keep]
            if with_neg:
                candidates = torch.cat([candidates, emb[2 * m :][keep]])
            sims = config.scale * anchors @ candidates.T
            target = torch.arange(anchors.shape[0])
            loss = loss + F.cross_entropy(sims, target)
    return loss


def fine_tune(
    encoder: Any,
    *,
    pairs: Sequence[Pair],
    label_index: dict[str, int],
    centroids: np.ndarray,
    config: TrainConfig,
    steps: int,
    progress: bool,
    oos_label: str,
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Train ``encoder`` in place for ``steps`` batches jointly with a cosine head started at
    ``centroids`` (n_labels x dim); returns the head (rows L2-normalised, float32) and the loss
    history (one entry per ``log_every`` steps: step, mean loss, elapsed seconds)."""
    import torch
    import torch.nn.functional as F

    encoder.train()
    head = torch.nn.Parameter(torch.tensor(centroids, dtype=torch.float32))
    optimizer, scheduler = _optimizer(encoder, head, config, steps)
    batches = epoch_batches(pairs, config, steps, config.seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    running = 0.0
    for step, batch in enumerate(batches):
        loss = _batch_loss(
            encoder, head, batch, label_index=label_index, config=config, oos_label=oos_label
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += float(loss.detach())
        if (step + 1) % config.log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (steps - step - 1)
            avg = running / ((step % config.log_every) + 1)
            history.append({"step": step + 1, "loss": avg, "elapsed_s": elapsed})
            if progress:
                logger.info(
                    "step %d/%d loss %.4f elapsed %s eta %s",
                    step + 1,
                    steps,
                    avg,
                    format_eta(elapsed),
                    format_eta(eta),
                )
            running = 0.0
    encoder.eval()
    trained = F.normalize(head.detach(), dim=-1).numpy().astype(np.float32)
    return trained, history
