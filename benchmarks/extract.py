"""How fast are per-example gradients turned into stored vectors? gist_index against the reference pipeline and
against plain training steps, measured in one run.

Configuration (paper-proportioned, scaled to a CPU): a Llama-style model of a few million parameters, LoRA r=128,
alpha=512 on q,k,v,o, d=8192, max length 512, examples from ../shared/data/pool.

* (a) gist_index: one batched pass per length bucket, per-example LoRA gradients from hooks, CountSketch to d;
* (b) the reference, LESS without its CUDA kernel: batch-size-1 backward on HF's loss, flattened gradients, a dense
      Rademacher projection generated block-wise from a seed, applied to 16 gradients at a time (as LESS/TRAK do);
* (c) the floor: plain LoRA training steps (HF forward with labels, backward, AdamW step) over the same batches.

Each method runs in a fresh subprocess (peak RSS = its own), after one warm-up batch. Also: peak memory of a whole
``build`` at 1x and 4x the examples (the same examples repeated, so that only their number changes), and the
inner-product distortion of CountSketch against a dense Gaussian projection of the same d on real gradients.

    python benchmarks/extract.py --quick          # < 10 minutes on a 2-core CPU
    python benchmarks/extract.py [--medium|--large] [--device cuda]

Prints a table, writes benchmarks/results/extract.json, and prints one JSON object as its last line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from gist_index.data import encode, parse_example  # noqa: E402
from gist_index.model import make_llama, new_lora, save_model, train_tokenizer  # noqa: E402

POOL = os.path.join(HERE, "..", "..", "shared", "data", "pool", "t0.jsonl.gz")
CACHE = os.path.join(HERE, "results", "cache", "extract")
PRESETS = {
    "quick": {"n": 32, "n_ref": 16, "mem_n": 32},
    "medium": {"n": 256, "n_ref": 48, "mem_n": 256},
    "large": {"n": 1024, "n_ref": 128, "mem_n": 1024},
}
MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 688, "max_positions": 512}
LORA = {"r": 128, "alpha": 512, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")}
DIM, MAX_LEN, BATCH = 8192, 512, 8


def read_pool(n: int, skip: int = 0) -> list[dict]:
    """``n`` records of the T0 pool, every 37th line (a spread over its tasks), after ``skip`` of them."""
    out = []
    with gzip.open(POOL, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i % 37 == 0:
                if skip:
                    skip -= 1
                    continue
                out.append(json.loads(line))
                if len(out) == n:
                    break
    return out


def setup() -> tuple[str, str]:
    """A cached random Llama (with a tokenizer trained on pool text) and a LoRA adapter with random B."""
    model_dir, adapter_dir = os.path.join(CACHE, "model"), os.path.join(CACHE, "adapter")
    if os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        return model_dir, adapter_dir
    texts = ["".join(t for t, _ in parse_example(r, "pool", 1).segments) for r in read_pool(3000, skip=2000)]
    tok = train_tokenizer(texts, vocab_size=8192)
    model = make_llama(tok, **MODEL)
    save_model(model, tok, model_dir)
    pm = new_lora(model, LORA["r"], LORA["alpha"], 0.0, LORA["targets"], seed=0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    pm.save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def fitting(tokenizer, n: int, skip: int = 0, whole: bool = False) -> list[tuple[dict, object]]:
    """(record, encoding) of the first ``n`` pool examples (after ``skip``) that keep a response within MAX_LEN
    tokens; with ``whole``, only those that are not truncated at all."""
    out = []
    for i, r in enumerate(read_pool(50 * n, skip=skip)):
        e = encode(parse_example(r, "t0.jsonl.gz", i + 1), tokenizer, MAX_LEN)
        if e.n_label_tokens and not (whole and e.truncated):
            out.append((r, e))
        if len(out) == n:
            break
    return out


def encoded(cm, n: int):
    """The first ``n`` pool examples that keep a response within MAX_LEN tokens."""
    return [e for _, e in fitting(cm.tokenizer, n)]


class Methods:
    """The three methods on one loaded model, so that they can be timed side by side."""

    def __init__(self, device: str):
        from gist_index.config import BuildConfig
        from gist_index.extract import CheckpointedModel
        from gist_index.project import CountSketchProjector, PcaProjector, RademacherProjector, inner_projector

        model_dir, adapter_dir = setup()
        self.device = device
        self.cm = CheckpointedModel(model_dir, [adapter_dir], device=device)
        self.countsketch = CountSketchProjector(self.cm.source_dim, DIM, seed=0)
        self.rademacher = RademacherProjector(self.cm.source_dim, DIM, seed=0)
        # build's default projection at its default rank (DIM/4); the cost does not depend on the basis's values
        inner, rank = inner_projector(self.cm.source_dim, 0).dim, BuildConfig(dim=DIM).resolved_pca_rank
        basis = torch.randn(inner, rank, generator=torch.Generator().manual_seed(0)) / inner**0.5
        self.pca = PcaProjector(self.cm.source_dim, DIM, 0, basis.numpy())
        self.params = [p.module.weight for p in self.cm.params]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def gist_index(self, enc) -> None:
        """(a) batched per-example gradients, CountSketch-projected."""
        self.cm.gradients(enc, 0, self.countsketch, batch_size=BATCH)

    def gist_index_pca(self, enc) -> None:
        """(a') the same through the pca projection (build's default): a CountSketch to its first stage, then one
        product with the basis per example."""
        self.cm.gradients(enc, 0, self.pca, batch_size=BATCH)

    def reference(self, enc) -> None:
        """(b) batch-size-1 backward, dense Rademacher projection of up to 16 gradients at a time."""
        from gist_index.extract import collate, reference_gradients

        pad = self.cm.tokenizer.pad_token_id
        for k in range(0, len(enc), 16):
            grads = torch.cat(
                [reference_gradients(self.cm.pm, collate([e], pad, self.device)) for e in enc[k : k + 16]]
            )
            self.rademacher.project(grads)

    def train_step(self, enc) -> None:
        """(c) plain LoRA training steps over the same length-bucketed batches."""
        from gist_index.extract import collate, length_buckets

        for p in self.params:
            p.requires_grad_(True)
        for b in length_buckets([e.n_tokens for e in enc], BATCH):
            batch = collate([enc[i] for i in b], self.cm.tokenizer.pad_token_id, self.device)
            labels = torch.where(batch.label_mask, batch.input_ids, torch.full_like(batch.input_ids, -100))
            self.cm.pm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.requires_grad_(False)

    def timed(self, name: str, enc) -> float:
        self.sync()
        t = time.perf_counter()
        getattr(self, name)(enc)
        self.sync()
        return time.perf_counter() - t


def interleaved(n: int, n_ref: int, device: str, round_size: int = 16) -> dict:
    """Throughput of the three methods, timed in alternation round by round over the same examples, so that a
    shared machine's load weighs on all of them alike."""
    m = Methods(device)
    enc = encoded(m.cm, n + round_size)
    names = ("gist_index", "gist_index_pca", "train_step", "reference")
    for name in names:  # warm-up
        m.timed(name, enc[: (2 if name == "reference" else round_size)])
    enc = enc[round_size:]
    out = {k: {"examples": 0, "tokens": 0, "seconds": 0.0} for k in names}
    for r in range(0, len(enc), round_size):
        part = enc[r : r + round_size]
        for name in names:
            if name == "reference" and out[name]["examples"] >= n_ref:
                continue
            out[name]["seconds"] += m.timed(name, part)
            out[name]["examples"] += len(part)
            out[name]["tokens"] += sum(e.n_tokens for e in part)
    for v in out.values():
        v["examples_per_s"] = v["examples"] / v["seconds"]
    out["lora_params"] = m.cm.source_dim
    return out


def memory_worker(method: str, n: int, device: str) -> dict:
    """Peak memory of one method alone in this process (``n`` examples)."""
    m = Methods(device)
    enc = encoded(m.cm, n)
    m.timed(method, enc)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mb": peak / 2**20}


def build_worker(n: int, repeat: int, device: str, out_dir: str) -> dict:
    """A whole ``build`` of ``n`` pool examples, each ``repeat`` times (new ids), at d=8192, 16 rows per chunk;
    peak memory of this process. Repeating the same examples keeps the length distribution (which sets the
    activation memory of the longest batch) the same at 1x and 4x, so only the number of examples changes."""
    from gist_index import BuildConfig, build

    model_dir, adapter_dir = setup()
    os.makedirs(out_dir, exist_ok=True)
    pool = os.path.join(out_dir, f"pool{n}x{repeat}.jsonl")
    from gist_index.model import load_tokenizer

    records = [r for r, _ in fitting(load_tokenizer(model_dir), n, skip=500, whole=True)]  # each has a gradient
    with open(pool, "w") as fh:
        for k in range(repeat):
            for r in records:
                fh.write(json.dumps({**r, "id": f"{r['id']}#{k}"}) + "\n")
    t = time.perf_counter()
    build(
        model_dir,
        [adapter_dir],
        [pool],
        os.path.join(out_dir, f"s{n}x{repeat}.gist"),
        BuildConfig(dim=DIM, max_length=MAX_LEN, batch_size=BATCH, chunk_rows=16, projection="countsketch"),
        device=device,
        progress=False,
        overwrite=True,
    )
    from gist_index import info

    summary = info(os.path.join(out_dir, f"s{n}x{repeat}.gist"))
    return {
        "examples": n * repeat,
        "with_gradient": summary["n_with_gradient"],
        "seconds": time.perf_counter() - t,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def distortion(device: str, n: int = 24) -> dict:
    """Inner-product error of CountSketch and of a dense Gaussian (same d) on pairs of real per-example gradients."""
    from gist_index.extract import CheckpointedModel
    from gist_index.project import CountSketchProjector, GaussianProjector, IdentityProjector

    model_dir, adapter_dir = setup()
    cm = CheckpointedModel(model_dir, [adapter_dir], device=device)
    g = torch.from_numpy(cm.gradients(encoded(cm, n), 0, IdentityProjector(cm.source_dim), batch_size=BATCH)["vectors"])
    g = g / g.norm(dim=1, keepdim=True)
    true = g @ g.T
    iu = torch.triu_indices(n, n, 1)
    out = {"pairs": int(iu.shape[1]), "mean_abs_cosine": float(true[iu[0], iu[1]].abs().mean())}
    for name, cls in (("countsketch", CountSketchProjector), ("gaussian", GaussianProjector)):
        p = cls(cm.source_dim, DIM, seed=1).project(g)
        err = (p @ p.T - true)[iu[0], iu[1]]
        out[name] = {"rms_error": float(err.pow(2).mean().sqrt()), "max_error": float(err.abs().max())}
    out["jl_rms_expected"] = float(np.sqrt((1 + out["mean_abs_cosine"] ** 2) / DIM))
    return out


def spawn(args: list[str]) -> dict:
    """Run this script as a worker subprocess and return its JSON answer."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for p in PRESETS:
        ap.add_argument(f"--{p}", dest="preset", action="store_const", const=p)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "extract.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n-ref", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.worker == "build":
            print(json.dumps(build_worker(args.n, args.repeat, args.device, os.path.join(CACHE, "stores"))))
        elif args.worker == "distortion":
            print(json.dumps(distortion(args.device)))
        elif args.worker == "interleaved":
            print(json.dumps(interleaved(args.n, args.n_ref, args.device)))
        else:
            print(json.dumps(memory_worker(args.worker, args.n, args.device)))
        return
    preset = args.preset or "quick"
    cfg = PRESETS[preset]
    t0 = time.time()
    setup()
    dev = ["--device", args.device]
    rows = spawn(["--worker", "interleaved", "--n", str(cfg["n"]), "--n-ref", str(cfg["n_ref"]), *dev])
    lora_params = rows.pop("lora_params")
    for m in rows:
        rows[m].update(spawn(["--worker", m, "--n", "16", *dev]))
    mem = [spawn(["--worker", "build", "--n", str(cfg["mem_n"]), "--repeat", str(k), *dev]) for k in (1, 4)]
    dist = spawn(["--worker", "distortion", *dev])
    a, b, c = (rows[m]["examples_per_s"] for m in ("gist_index", "reference", "train_step"))
    print(
        f"\nextract.py --{preset} on {args.device}: model {MODEL}, LoRA {LORA['r']}/{LORA['alpha']} on q,k,v,o "
        f"({lora_params:,} LoRA params), d={DIM}, max length {MAX_LEN}, batch {BATCH}\n"
    )
    print(f"{'method':<12} {'examples':>8} {'ex/s':>8} {'tokens/s':>9} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for m, r in rows.items():
        print(
            f"{m:<12} {r['examples']:>8} {r['examples_per_s']:>8.2f} {r['tokens'] / r['seconds']:>9.0f} "
            f"{r['peak_rss_mb']:>12.0f} {r['peak_gpu_mb']:>12.0f}"
        )
    print(f"\nspeed-up over the reference (a/b): {a / b:.2f}   (goal >= 3)")
    print(f"fraction of a training step (a/c): {a / c:.2f}   (goal >= 0.8)")
    pca = rows["gist_index_pca"]["examples_per_s"]
    print(f"pca projection (a'), fraction of a training step: {pca / c:.2f}; of CountSketch's speed: {pca / a:.2f}")
    ratio = mem[1]["peak_rss_mb"] / mem[0]["peak_rss_mb"]
    print(
        f"build peak RSS: {mem[0]['examples']} examples {mem[0]['peak_rss_mb']:.0f} MB, "
        f"{mem[1]['examples']} examples {mem[1]['peak_rss_mb']:.0f} MB (ratio {ratio:.2f})"
    )
    print(
        f"inner-product RMS error on {dist['pairs']} pairs of real gradients at d={DIM}: CountSketch "
        f"{dist['countsketch']['rms_error']:.4f}, dense Gaussian {dist['gaussian']['rms_error']:.4f} "
        f"(JL expectation {dist['jl_rms_expected']:.4f})"
    )
    result = {
        "preset": preset,
        "device": args.device,
        "model": MODEL,
        "lora": {**LORA, "targets": list(LORA["targets"])},
        "dim": DIM,
        "max_length": MAX_LEN,
        "batch_size": BATCH,
        "methods": rows,
        "build_memory": mem,
        "distortion": dist,
        "speedup_vs_reference": a / b,
        "fraction_of_train_step": a / c,
        "pca_fraction_of_train_step": pca / c,
        "pca_fraction_of_countsketch": pca / a,
        "build_memory_ratio_4x": mem[1]["peak_rss_mb"] / mem[0]["peak_rss_mb"],
        "seconds": time.time() - t0,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out} in {time.time() - t0:.0f} s; reproduce: python benchmarks/extract.py --{preset}")
    print(
        json.dumps(
            {
                "speedup_vs_reference": round(a / b, 3),
                "fraction_of_train_step": round(a / c, 3),
                "build_memory_ratio_4x": round(result["build_memory_ratio_4x"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
