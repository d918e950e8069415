"""``gist-index demo``: the whole pipeline on the real-data sample bundled with the package, on a CPU.

1. train a byte-level BPE tokenizer and a small Llama from scratch on the sample pool (cached in the workdir);
2. LoRA warmup on a random fifth of the pool, two epochs (a checkpoint each);
3. build a store of projected gradients (d = 1024) with a FAISS index;
4. select the top 5% for each bundled target (GSM8K, BBH, Rotten Tomatoes) and print the best examples.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from importlib import resources

import torch

from . import api
from .config import BuildConfig, LoraConfig, SelectConfig, TrainConfig
from .data import read_examples
from .model import make_llama, save_model, train_tokenizer
from .train import pretrain_lm

log = logging.getLogger(__name__)


def sample_dir() -> str:
    """The folder of the bundled sample (pool.jsonl.gz and <target>_val.jsonl.gz)."""
    return str(resources.files("gist_index") / "sample")


def base_model(workdir: str, pool: str, progress: bool = True) -> str:
    """A small Llama pretrained on the sample pool, cached under ``workdir/base``."""
    out = os.path.join(workdir, "base")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    texts = ["".join(t for t, _ in ex.segments) for ex in read_examples(pool)]
    tok = train_tokenizer(texts, vocab_size=2048)
    model = make_llama(tok, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, max_positions=512)
    pretrain_lm(model, tok, texts, epochs=3, lr=2e-3, batch_size=16, max_length=512, progress=progress)
    return save_model(model, tok, out)


def run_demo(workdir: str = "gist-demo", top: int = 5, progress: bool = True) -> dict:
    """Run the demo; print the selected examples per target and return the selections' reports."""
    torch.manual_seed(0)
    os.makedirs(workdir, exist_ok=True)
    sample = sample_dir()
    pool = os.path.join(sample, "pool.jsonl.gz")
    t0 = time.time()
    print(f"[1/4] base model: a small Llama trained from scratch on {pool}")
    model = base_model(workdir, pool, progress)
    print(f"[2/4] LoRA warmup on 20% of the pool ({time.time() - t0:.0f} s)")
    warm = os.path.join(workdir, "warmup")
    ckpts = sorted(glob.glob(os.path.join(warm, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    if len(ckpts) < 2:
        ckpts = api.warmup(
            model,
            [pool],
            warm,
            fraction=0.2,
            lora=LoraConfig(r=8, alpha=32, dropout=0.1),
            train=TrainConfig(epochs=2, lr=1e-3, batch_size=16, micro_batch_size=16, max_length=512),
            progress=progress,
        )
    print(f"[3/4] gradient store: d=1024, {len(ckpts)} checkpoints ({time.time() - t0:.0f} s)")
    store = os.path.join(workdir, "pool.gist")
    api.build(
        model,
        ckpts,
        [pool],
        store,
        BuildConfig(dim=1024, max_length=512, batch_size=16, chunk_rows=256),
        progress=progress,
    )
    info = api.info(store)
    print(f"      {info['n_examples']} examples, {info['bytes_per_example']:.0f} bytes/example on disk")
    print(f"[4/4] selecting the top 5% per target ({time.time() - t0:.0f} s)")
    reports = {}
    for val in sorted(glob.glob(os.path.join(sample, "*_val.jsonl.gz"))):
        name = os.path.basename(val).replace("_val.jsonl.gz", "")
        out = os.path.join(workdir, f"selected_{name}.jsonl")
        sel = api.select(store, [val], out, SelectConfig(fraction=0.05), progress=False)
        rep = sel.report()
        reports[name] = rep
        print(
            f"\n== {name}: {rep['n_selected']} of {rep['n_pool']} selected, {len(rep['subtasks'])} sub-task(s), "
            f"rank k={rep['rank']} -> {out}"
        )
        with open(out) as fh:
            for line in list(fh)[:top]:
                rec = json.loads(line)
                prompt = rec["messages"][0]["content"].replace("\n", " ")
                print(f"  #{rec['rank']:<3} {rec['score']:+.3f}  [{rec.get('task', '?')}] {prompt[:90]}")
    print(f"\ndone in {time.time() - t0:.0f} s; everything is in {workdir}/")
    return reports
