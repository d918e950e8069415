"""LoRA training: the warmup that produces the adapter checkpoints a build needs, and fine-tuning on a selection.

Checkpoints are written after every epoch in the usual transformers/peft layout, so transformers' Trainer
checkpoints and ours are interchangeable as ``--adapter`` inputs::

    OUT/checkpoint-<step>/adapter_model.safetensors, adapter_config.json   (peft)
    OUT/checkpoint-<step>/optimizer.pt, scheduler.pt                       (torch state dicts, tensors only)
    OUT/checkpoint-<step>/trainer_state.json                               (global_step, epoch, log_history)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Sequence

import numpy as np
import torch

from .config import LoraConfig, TrainConfig
from .data import Encoded, Example, encode
from .errors import ConfigError
from .extract import collate, length_buckets, per_example_loss
from .model import new_lora
from .progress import bar as progress_bar

log = logging.getLogger(__name__)


def encode_all(examples: Sequence[Example], tokenizer, max_length: int) -> list[Encoded]:
    """Tokenize examples, dropping those whose response was truncated away (logged)."""
    out = []
    for ex in examples:
        enc = encode(ex, tokenizer, max_length)
        if enc.n_label_tokens > 0:
            out.append(enc)
    if len(out) < len(examples):
        log.info(
            "%d of %d examples have no label tokens within %d tokens; skipped",
            len(examples) - len(out),
            len(examples),
            max_length,
        )
    if not out:
        raise ConfigError("no example has a response within max-length tokens: nothing to train on")
    return out


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def train_lora(
    base,
    tokenizer,
    examples: Sequence[Example],
    lora: LoraConfig,
    cfg: TrainConfig,
    out_dir: str | None = None,
    progress: bool = True,
    device="cpu",
):
    """Train a fresh LoRA adapter on ``examples``; save a checkpoint per epoch under ``out_dir`` (if given).

    Returns the peft model (in eval mode) and the list of checkpoint directories.
    """
    enc = encode_all(examples, tokenizer, cfg.max_length)
    rng = random.Random(cfg.seed)
    pm = new_lora(base, lora.r, lora.alpha, lora.dropout, lora.target_modules, seed=cfg.seed).to(device)
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(enc) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_ratio * total)))
    history: list[dict] = []
    checkpoints: list[str] = []
    step = 0
    bar = progress_bar(total=total, desc="train", unit="step", enabled=progress)
    pm.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(enc)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            micro = length_buckets([enc[i].n_tokens for i in idx], cfg.micro_batch_size)
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for mb in micro:
                batch = collate([enc[idx[j]] for j in mb], tokenizer.pad_token_id, device)
                loss = per_example_loss(pm, batch).sum() / len(idx)
                loss.backward()
                step_loss += float(loss.detach())
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            step += 1
            history.append(
                {"epoch": epoch + (s + 1) / steps_per_epoch, "step": step, "learning_rate": lr, "loss": step_loss}
            )
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
        if out_dir:
            checkpoints.append(save_checkpoint(pm, opt, sched, out_dir, step, epoch + 1, history))
    bar.close()
    pm.eval()
    return pm, checkpoints


def save_checkpoint(pm, opt, sched, out_dir: str, step: int, epoch: int, history: list[dict]) -> str:
    """Save adapter, optimizer and scheduler state and the trainer state as ``checkpoint-<step>``."""
    d = os.path.join(out_dir, f"checkpoint-{step}")
    os.makedirs(d, exist_ok=True)
    pm.save_pretrained(d)
    torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
    torch.save(sched.state_dict(), os.path.join(d, "scheduler.pt"))
    with open(os.path.join(d, "trainer_state.json"), "w") as fh:
        json.dump({"global_step": step, "epoch": float(epoch), "log_history": history}, fh, indent=1)
    log.info("saved %s", d)
    return d


def checkpoint_weights(adapters: Sequence[str]) -> list[float]:
    """LESS's default checkpoint weights: the mean learning rate of the epoch that ends at each checkpoint.

    Read from ``trainer_state.json``; uniform weights when any checkpoint has none.
    """
    weights = []
    prev_step = 0
    for a in adapters:
        path = os.path.join(a, "trainer_state.json")
        try:
            with open(path) as fh:
                st = json.load(fh)
            step = int(st["global_step"])
            lrs = [
                h["learning_rate"] for h in st["log_history"] if "learning_rate" in h and prev_step < h["step"] <= step
            ]
        except (OSError, ValueError, KeyError, TypeError):
            lrs = []
        if not lrs:
            return [1.0] * len(adapters)
        weights.append(float(np.mean(lrs)))
        prev_step = step
    if sum(weights) <= 0:
        return [1.0] * len(adapters)
    return weights


@torch.no_grad()
def evaluate_loss(
    model, tokenizer, examples: Sequence[Example], max_length: int, batch_size: int = 16, device="cpu"
) -> np.ndarray:
    """Per-example mean token loss of ``examples`` under ``model`` (examples without labels are skipped)."""
    enc = encode_all(examples, tokenizer, max_length)
    out = np.zeros(len(enc))
    model.eval()
    for b in length_buckets([e.n_tokens for e in enc], batch_size):
        batch = collate([enc[i] for i in b], tokenizer.pad_token_id, device)
        out[b] = per_example_loss(model, batch).cpu().numpy()
    return out


def pretrain_lm(
    model,
    tokenizer,
    texts: Sequence[str],
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
    progress: bool = True,
    device="cpu",
) -> list[float]:
    """Full-parameter causal-LM training on plain texts (loss on every token): to give a small model from scratch
    some knowledge of the data before LoRA. Returns the loss of each step."""
    torch.manual_seed(seed)
    enc = []
    for t in texts:
        ids = np.asarray(
            [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        )
        ids = ids[:max_length]
        enc.append(Encoded(ids, np.ones(len(ids), dtype=bool), False))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = math.ceil(len(enc) / batch_size) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 20)))
    rng = random.Random(seed)
    losses = []
    bar = progress_bar(total=steps, desc="pretrain", unit="step", enabled=progress)
    for _ in range(epochs):
        order = list(range(len(enc)))
        rng.shuffle(order)
        # batches of similar length, visited in random order
        chunks = [order[i : i + batch_size * 8] for i in range(0, len(order), batch_size * 8)]
        batches = [[c[j] for j in b] for c in chunks for b in length_buckets([enc[i].n_tokens for i in c], batch_size)]
        rng.shuffle(batches)
        for b in batches:
            batch = collate([enc[i] for i in b], tokenizer.pad_token_id, device)
            loss = per_example_loss(model, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses
