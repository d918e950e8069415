"""Per-example LoRA gradients for a whole batch at once, projected as they are produced.

How a batch is processed:

* examples are tokenized once, sorted by length into buckets (little padding) and right-padded;
* the decoder runs on the batch; the LM head is applied only at positions that carry a label, and each
  example's loss is the mean over its label tokens (what a batch-size-1 ``model(**batch).loss`` gives);
* LoRA weights are frozen, so autograd computes no batch-summed weight gradients at all; instead, hooks on each
  LoRA ``nn.Linear`` catch its input and the gradient of its output, and the per-example weight gradient
  ``sum_t grad_out[t] (x) input[t]`` is formed by one batched matmul, optionally Adam-preconditioned as LESS
  does, projected into the running ``[batch, dim]`` result and dropped. Memory holds one module's per-example
  gradients at a time, never a whole gradient vector.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data import Encoded
from .errors import ModelLoadError
from .project import Projector

log = logging.getLogger(__name__)

ADAM_BETA1, ADAM_BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
LORA_DAMPING = 1e-3  # the lora store's delta, as a share of the mean eigenvalue of the r x r matrix it inverts


@dataclass
class Batch:
    """Right-padded token ids and masks on one device."""

    input_ids: torch.Tensor  # [b, T] int64
    attention_mask: torch.Tensor  # [b, T] int64
    label_mask: torch.Tensor  # [b, T] bool: token t carries loss (predicted from h[t-1])

    @property
    def size(self) -> int:
        """Number of examples."""
        return int(self.input_ids.shape[0])


def collate(encoded: Sequence[Encoded], pad_id: int, device) -> Batch:
    """Stack encoded examples into a right-padded batch."""
    T = max(e.n_tokens for e in encoded)
    ids = np.full((len(encoded), T), pad_id, dtype=np.int64)
    att = np.zeros((len(encoded), T), dtype=np.int64)
    lab = np.zeros((len(encoded), T), dtype=bool)
    for i, e in enumerate(encoded):
        n = e.n_tokens
        ids[i, :n] = e.input_ids
        att[i, :n] = 1
        lab[i, :n] = e.label_mask
    lab[:, 0] = False
    dev = torch.device(device)
    return Batch(torch.from_numpy(ids).to(dev), torch.from_numpy(att).to(dev), torch.from_numpy(lab).to(dev))


def length_buckets(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Group indices into batches of similar length (sorted, stable), each at most ``batch_size`` examples and,
    when ``max_tokens`` is given, at most that many padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = max(lengths[i], max((lengths[j] for j in cur), default=0))
        if cur and (len(cur) >= batch_size or (max_tokens and longest * (len(cur) + 1) > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def per_example_loss(model, batch: Batch, inputs_embeds_grad: bool = False) -> torch.Tensor:
    """Mean token loss of each example, with the LM head applied only where there are labels.

    ``model`` is a causal LM (possibly wrapped by peft). With ``inputs_embeds_grad`` the input embeddings are
    made to require grad, so a backward pass reaches frozen LoRA layers.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = lm.get_decoder()
    head = lm.get_output_embeddings()
    embeds = decoder.get_input_embeddings()(batch.input_ids)
    if inputs_embeds_grad:
        embeds = embeds.detach().requires_grad_(True)
    hidden = decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    target = batch.label_mask[:, 1:]
    bi, ti = target.nonzero(as_tuple=True)
    logits = head(hidden[bi, ti])
    tok_loss = F.cross_entropy(logits.float(), batch.input_ids[bi, ti + 1], reduction="none")
    counts = target.sum(1).clamp(min=1).to(tok_loss.dtype)
    return torch.zeros(batch.size, dtype=tok_loss.dtype, device=tok_loss.device).index_add_(0, bi, tok_loss) / counts


@dataclass(frozen=True)
class LoraParam:
    """One LoRA weight: its canonical name (adapter name removed), module, size and offset in the gradient."""

    name: str
    module: torch.nn.Linear
    numel: int
    offset: int


def lora_params(pm) -> list[LoraParam]:
    """The LoRA weights of a peft model in ``named_parameters`` order, with their offsets in the flat gradient."""
    modules = dict(pm.named_modules())
    out: list[LoraParam] = []
    offset = 0
    for name, p in pm.named_parameters():
        if "lora_" not in name:
            continue
        if not name.endswith(".weight"):
            raise ModelLoadError(f"unsupported LoRA parameter {name} (only LoRA weight matrices are handled)")
        mod = modules[name[: -len(".weight")]]
        if not isinstance(mod, torch.nn.Linear) or mod.bias is not None:
            raise ModelLoadError(f"unsupported LoRA module {name} ({type(mod).__name__}); only Linear LoRA is handled")
        parts = name.split(".")
        canon = ".".join(parts[:-2] + parts[-1:])  # drop the adapter name: ...lora_A.default.weight -> ...lora_A.weight
        out.append(LoraParam(canon, mod, p.numel(), offset))
        offset += p.numel()
    if not out:
        raise ModelLoadError("the model has no LoRA parameters")
    return out


def load_adam_state(checkpoint: str, params: Sequence[LoraParam], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Adam's first and second moments for each LoRA weight, from ``optimizer.pt`` of a checkpoint.

    The file is read with ``torch.load(weights_only=True)`` (no arbitrary unpickling). States are matched to
    parameters by order, as transformers' Trainer and LESS do, and every shape is checked.
    """
    path = os.path.join(checkpoint, "optimizer.pt")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{checkpoint}: --gradient adam needs optimizer.pt beside the adapter; none found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: optimizer state does not load ({type(exc).__name__}: {exc})") from None
    state = sd.get("state", {}) if isinstance(sd, dict) else {}
    order = [i for g in sd.get("param_groups", []) for i in g.get("params", [])] or sorted(state)
    if len(order) != len(params):
        raise ModelLoadError(
            f"{path}: optimizer has {len(order)} parameters, the adapter has {len(params)} LoRA weights"
        )
    out = []
    for idx, p in zip(order, params):
        st = state.get(idx)
        if st is None or "exp_avg" not in st or "exp_avg_sq" not in st:
            raise ModelLoadError(f"{path}: no Adam moments for parameter {idx} ({p.name}); was it trained with Adam?")
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if m.numel() != p.numel or v.numel() != p.numel:
            raise ModelLoadError(f"{path}: state {idx} has {m.numel()} values, parameter {p.name} has {p.numel}")
        out.append((m.reshape(-1).float().to(device), v.reshape(-1).float().to(device)))
    return out


def precondition(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, momentum: bool = True) -> torch.Tensor:
    """LESS's Adam-preconditioned gradient ``(b1 m + (1-b1) g) / sqrt(b2 v + (1-b2) g^2 + eps)``, or without the
    shared momentum term ``b1 m`` (``momentum=False``)."""
    num = (ADAM_BETA1 * m + (1 - ADAM_BETA1) * g) if momentum else (1 - ADAM_BETA1) * g
    return num / torch.sqrt(ADAM_BETA2 * v + (1 - ADAM_BETA2) * g * g + ADAM_EPS)


def lora_partner(name: str) -> str:
    """The canonical name of the other factor of the same adapted module (``lora_A`` <-> ``lora_B``)."""
    if ".lora_A." in name:
        return name.replace(".lora_A.", ".lora_B.")
    if ".lora_B." in name:
        return name.replace(".lora_B.", ".lora_A.")
    raise ModelLoadError(f"{name}: not a LoRA A or B weight")


def lora_metrics(params: Sequence[LoraParam], damping: float = LORA_DAMPING) -> list[torch.Tensor]:
    """LoRA's own r x r preconditioners at the model's current weights, one per LoRA weight (the ``lora`` store).

    For an adapted module with factors ``B`` [out, r] and ``A`` [r, in]: A's gradient is multiplied on the left by
    ``(B^T B + delta I)^-1`` and B's on the right by ``(A A^T + delta I)^-1``, with ``delta = damping x trace / r``
    of the matrix inverted: the step of scaled (Riemannian-preconditioned) gradient descent on the factors. Its
    first-order effect on the weight is the gradient's projection on B's column space plus its projection on A's
    row space, so the A and B sides count alike, and the coupling between them is kept (not a diagonal).
    """
    by_name = {p.name: p for p in params}
    out = []
    for p in params:
        other = by_name.get(lora_partner(p.name))
        if other is None:
            raise ModelLoadError(f"--gradient lora: {p.name} has no partner {lora_partner(p.name)}")
        w = other.module.weight.detach().double()
        gram = w.T @ w if ".lora_A." in p.name else w @ w.T  # B^T B for A's gradient, A A^T for B's
        r = gram.shape[0]
        delta = damping * float(gram.diagonal().sum()) / r
        if not delta > 0:
            raise ModelLoadError(f"--gradient lora: the LoRA factor {other.name} is all zeros (warm it up first)")
        out.append(torch.linalg.inv(gram + delta * torch.eye(r, dtype=gram.dtype, device=gram.device)).float())
    return out


def lora_precondition(g: torch.Tensor, p: LoraParam, metric: torch.Tensor) -> torch.Tensor:
    """Per-example gradients ``g`` [b, numel] of LoRA weight ``p`` times its r x r ``metric`` (:func:`lora_metrics`):
    on the left for an A weight ([r, in]), on the right for a B weight ([out, r])."""
    shape = (g.shape[0], *p.module.weight.shape)
    g = g.reshape(shape)
    g = metric @ g if ".lora_A." in p.name else g @ metric
    return g.reshape(shape[0], -1)


class GradientExtractor:
    """Computes projected per-example LoRA gradients of a peft model, batch by batch.

    ``adam``: per-parameter (exp_avg, exp_avg_sq) to precondition as LESS does,
    ``(b1 m + (1-b1) g) / sqrt(b2 v + (1-b2) g^2 + eps)``; with ``momentum=False`` without the momentum term
    ``b1 m``, which every example shares: ``(1-b1) g / sqrt(...)`` (the ``rms`` store). ``lora``: per-parameter
    r x r matrices from :func:`lora_metrics` (the ``lora`` store). Neither gives plain (SGD) gradients.
    """

    def __init__(
        self,
        model,
        projector: Projector,
        adam: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        momentum: bool = True,
        lora: list[torch.Tensor] | None = None,
    ):
        self.model = model
        self.params = lora_params(model)
        self.source_dim = sum(p.numel for p in self.params)
        if projector.source_dim != self.source_dim:
            raise ModelLoadError(
                f"projection expects {projector.source_dim} LoRA coordinates, the model has {self.source_dim}"
            )
        self.projector = projector
        if adam is not None and lora is not None:
            raise ValueError("give adam moments or LoRA metrics, not both")
        self.adam = adam
        self.momentum = momentum
        self.lora = lora
        self._inputs: dict[int, torch.Tensor] = {}

    def _precondition(self, k: int, g: torch.Tensor) -> torch.Tensor:
        m, v = self.adam[k]
        return precondition(g, m, v, self.momentum)

    def compute(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Return ``vectors`` [b, dim] (float32), ``grad_norm`` [b] of the unprojected (preconditioned) gradient,
        and ``loss`` [b]."""
        b = batch.size
        device = batch.input_ids.device
        out = torch.zeros(b, self.projector.buffer_dim, dtype=torch.float32, device=device)
        sq = torch.zeros(b, dtype=torch.float32, device=device)
        handles = []

        def on_forward(k: int, p: LoraParam):
            def hook(module, args, output):
                inp = args[0]

                def on_grad(gout):
                    g = torch.bmm(gout.transpose(1, 2).float(), inp.float()).reshape(b, -1)
                    if self.adam is not None:
                        g = self._precondition(k, g)
                    elif self.lora is not None:
                        g = lora_precondition(g, p, self.lora[k])
                    sq.add_(torch.linalg.vector_norm(g, dim=1).square())
                    self.projector.project_into(out, g, p.offset)

                if output.requires_grad:
                    output.register_hook(on_grad)

            return hook

        for k, p in enumerate(self.params):
            handles.append(p.module.register_forward_hook(on_forward(k, p)))
        try:
            with torch.enable_grad():
                losses = per_example_loss(self.model, batch, inputs_embeds_grad=True)
                losses.sum().backward()
        finally:
            for h in handles:
                h.remove()
        return {"vectors": self.projector.finish(out), "grad_norm": sq.sqrt(), "loss": losses.detach().float()}


def reference_gradients(model, batch: Batch, adam=None, momentum: bool = True) -> torch.Tensor:
    """Per-example LoRA gradients by a batch-size-1 autograd loop over HF's own loss (the slow reference);
    preconditioned with ``adam`` moments as :func:`precondition` when given."""
    rows = []
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for i in range(batch.size):
            n = int(batch.attention_mask[i].sum())
            ids = batch.input_ids[i : i + 1, :n]
            labels = torch.where(batch.label_mask[i : i + 1, :n], ids, torch.full_like(ids, -100))
            model.zero_grad()
            with torch.enable_grad():
                model(input_ids=ids, labels=labels).loss.backward()
            g = torch.cat([p.grad.reshape(-1).float() for p in params])
            if adam is not None:
                m = torch.cat([a[0] for a in adam])
                v = torch.cat([a[1] for a in adam])
                g = precondition(g, m, v, momentum)
            rows.append(g)
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)
        model.zero_grad()
    return torch.stack(rows)


class CheckpointedModel:
    """A base model with a LoRA adapter whose weights can be switched between the checkpoints of a warmup.

    All checkpoints must share one LoRA configuration (rank, alpha, target modules).
    """

    def __init__(
        self,
        model: str,
        adapters: Sequence[str],
        device=None,
        model_dtype: str = "float32",
        trust_remote_code: bool = False,
    ):
        from .model import attach_adapter, load_base_model, load_tokenizer, read_adapter_config, resolve_device

        if not adapters:
            raise ModelLoadError("at least one --adapter checkpoint is needed (run `gist-index warmup` first)")
        self.model_name = model
        self.adapters = [os.fspath(a) for a in adapters]
        self.device = resolve_device(device)
        configs = [read_adapter_config(a) for a in self.adapters]
        keys = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora")
        self.lora = {k: configs[0].get(k) for k in keys}
        if isinstance(self.lora["target_modules"], list):
            self.lora["target_modules"] = sorted(self.lora["target_modules"])
        for a, c in zip(self.adapters[1:], configs[1:]):
            other = {k: (sorted(c[k]) if isinstance(c.get(k), list) else c.get(k)) for k in keys}
            if other != self.lora:
                raise ModelLoadError(f"{a}: LoRA configuration {other} differs from {self.adapters[0]}'s {self.lora}")
        if self.lora.get("use_dora"):
            raise ModelLoadError(f"{self.adapters[0]}: DoRA adapters are not supported")
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        base = load_base_model(model, model_dtype, self.device, trust_remote_code)
        self.pm = attach_adapter(base, self.adapters[0]).to(self.device)
        for p in self.pm.parameters():
            p.requires_grad_(False)
        self.params = lora_params(self.pm)
        self.source_dim = sum(p.numel for p in self.params)
        self._weights = [self._read_adapter(a) for a in self.adapters]
        self._adam: dict[int, list] = {}
        self.current = -1
        self.use(0)

    def _read_adapter(self, adapter: str) -> list[torch.Tensor]:
        st = os.path.join(adapter, "adapter_model.safetensors")
        try:
            if os.path.isfile(st):
                from safetensors.torch import load_file

                sd = load_file(st)
            else:
                sd = torch.load(os.path.join(adapter, "adapter_model.bin"), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{adapter}: adapter weights do not load ({type(exc).__name__}: {exc})") from None
        out = []
        for p in self.params:
            if p.name not in sd or sd[p.name].numel() != p.numel:
                raise ModelLoadError(f"{adapter}: adapter weights lack {p.name} or have another shape")
            out.append(sd[p.name])
        return out

    def use(self, c: int) -> None:
        """Load checkpoint ``c``'s LoRA weights into the model."""
        if c != self.current:
            with torch.no_grad():
                for p, w in zip(self.params, self._weights[c]):
                    p.module.weight.copy_(w.reshape(p.module.weight.shape))
            self.current = c

    def adam_state(self, c: int):
        """Adam moments of checkpoint ``c`` (read once, kept on the CPU, moved to the device when used)."""
        if c not in self._adam:
            self._adam[c] = load_adam_state(self.adapters[c], self.params, "cpu")
        return [(m.to(self.device), v.to(self.device)) for m, v in self._adam[c]]

    def fingerprint(self) -> dict:
        """What identifies the gradients this model produces (stored in a store and checked on queries)."""
        from .model import adapter_fingerprint, model_fingerprint

        return {
            "model": model_fingerprint(self.model_name),
            "adapters": [adapter_fingerprint(a) for a in self.adapters],
            "lora": self.lora,
            "source_dim": self.source_dim,
        }

    def gradients(
        self,
        encoded: Sequence[Encoded],
        c: int,
        projector: Projector,
        gradient: str = "sgd",
        batch_size: int = 16,
        max_tokens: int = 0,
        on_batch=None,
    ) -> dict[str, np.ndarray]:
        """Projected per-example gradients of ``encoded`` at checkpoint ``c``, as numpy arrays in input order."""
        self.use(c)
        adam = self.adam_state(c) if gradient in ("adam", "rms") else None
        lora = lora_metrics(self.params) if gradient == "lora" else None
        ex = GradientExtractor(self.pm, projector, adam, momentum=gradient == "adam", lora=lora)
        n = len(encoded)
        out = {
            "vectors": np.zeros((n, projector.dim), np.float32),
            "grad_norm": np.zeros(n, np.float32),
            "loss": np.zeros(n, np.float32),
        }
        for b in length_buckets([e.n_tokens for e in encoded], batch_size, max_tokens or None):
            res = ex.compute(collate([encoded[i] for i in b], self.tokenizer.pad_token_id, self.device))
            for k in out:
                out[k][b] = res[k].cpu().numpy()
            if on_batch is not None:
                on_batch(len(b))
        return out
