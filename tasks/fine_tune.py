"""The torch fine-tuning loop of ``tasks.train``: single-text batches, a cosine classifier head
trained with cross-entropy, AdamW with a linear warm-up and decay, the word-embedding matrix
frozen.

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

if TYPE_CHECKING:
    import torch

    from tasks.train import TrainConfig

logger = logging.getLogger(__name__)

_NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")
_WORD_EMBEDDINGS = "word_embeddings"
_BUCKET_BATCHES = 16  # texts are sorted by length within chunks of this many batches


def epochs_for(n_texts: int, n_labels: int, config: TrainConfig) -> float:
    """Passes over the training texts. The few-shot rule: every intent gets at least
    ``few_shot_epochs * few_shot_examples`` example-passes, so with ``few_shot_examples`` (8)
    or fewer texts per intent on average it is ``few_shot_epochs`` (8) passes, with 16 it is 4,
    and from 32 per intent on it is ``epochs`` (2)."""
    per_intent = n_texts / max(n_labels, 1)
    wanted = config.few_shot_epochs * config.few_shot_examples / max(per_intent, 1e-9)
    return min(config.few_shot_epochs, max(config.epochs, wanted))


def plan_steps(n_texts: int, n_labels: int, config: TrainConfig) -> int:
    """Optimiser steps: :func:`epochs_for` passes over ``n_texts`` texts in batches of
    ``batch_size``, at least ``min_steps``, at most ``max_steps``."""
    per_epoch = math.ceil(n_texts / config.batch_size)
    steps = max(config.min_steps, math.ceil(per_epoch * epochs_for(n_texts, n_labels, config)))
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    return max(steps, 1)


def text_batches(
    texts: Sequence[str], batch_size: int, steps: int, rng: random.Random
) -> list[list[int]]:
    """``steps`` batches of text indices: each pass is a fresh permutation, sorted by length
    within chunks of 16 batches (less padding), the batches of a pass shuffled; batches of one
    text are dropped (a one-row batch gives no useful gradient)."""
    if len(texts) < 2:
        raise ValueError("cannot form a batch: need at least two training texts")
    out: list[list[int]] = []
    chunk = batch_size * _BUCKET_BATCHES
    while len(out) < steps:
        order = list(range(len(texts)))
        rng.shuffle(order)
        epoch: list[list[int]] = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: len(texts[i]))
            epoch += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
        rng.shuffle(epoch)
        out += [b for b in epoch if len(b) >= 2]
    return out[:steps]


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


def trainable_parameters(encoder: Any, config: TrainConfig) -> list[tuple[str, Any]]:
    """The encoder's (name, parameter) pairs that are trained; with ``freeze_word_embeddings``
    the word-embedding matrix is frozen (``requires_grad`` off): half of MiniLM's weights, so
    less work per step, and vocabulary missing from the training data keeps its pretrained
    geometry."""
    named = []
    for name, param in encoder.named_parameters():
        if config.freeze_word_embeddings and _WORD_EMBEDDINGS in name:
            param.requires_grad_(False)
            continue
        named.append((name, param))
    return named


def _optimizer(
    named: list[tuple[str, Any]], head: torch.nn.Parameter, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on biases and layer norms; the head at its own learning rate) and
    a linear warm-up over ``warmup_ratio`` of the steps, then a linear decay to 0."""
    import torch

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


def fine_tune(
    encoder: Any,
    *,
    texts: Sequence[str],
    y: np.ndarray,
    centroids: np.ndarray,
    config: TrainConfig,
    steps: int,
    device: str,
    progress: bool,
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Train ``encoder`` (already on ``device``) in place for ``steps`` batches of single texts
    with cross-entropy against a cosine head (``scale`` x cosine to each class row) started at
    ``centroids`` (n_labels x dim); returns the head (rows L2-normalised, float32, CPU) and the
    loss history (one entry per ``log_every`` steps: step, mean loss, elapsed seconds)."""
    import torch
    import torch.nn.functional as F

    encoder.train()
    named = trainable_parameters(encoder, config)
    head = torch.nn.Parameter(torch.tensor(centroids, dtype=torch.float32, device=device))
    optimizer, scheduler = _optimizer(named, head, config, steps)
    targets = torch.tensor(y, dtype=torch.long, device=device)
    batches = text_batches(texts, config.batch_size, steps, random.Random(config.seed))
    params = [p for _, p in named]
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    running = 0.0
    for step, batch in enumerate(batches):
        features = encoder.preprocess([texts[i] for i in batch])
        features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
        emb = F.normalize(encoder(features)["sentence_embedding"], dim=-1)
        logits = config.scale * emb @ F.normalize(head, dim=-1).T
        loss = F.cross_entropy(logits, targets[batch], label_smoothing=config.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
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
    trained = F.normalize(head.detach(), dim=-1).cpu().numpy().astype(np.float32)
    return trained, history
