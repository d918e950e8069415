"""Loading the base model, its tokenizer and LoRA adapters; fingerprints that tie a store to them.

Nothing here downloads by itself: a path that exists locally is loaded from disk; anything else is handed to
transformers as a hub name (which needs network access). ``trust_remote_code`` is off unless asked for.
Also: tiny Llama models and tokenizers built from a config, for tests, the demo and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence

import torch

from .data import sha256_file
from .errors import InputNotFoundError, ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_tokenizer(model: str, trust_remote_code: bool = False):
    """Load the tokenizer that belongs to ``model``; it must be a fast tokenizer (for offset mappings)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(f"{model}: tokenizer does not load ({type(exc).__name__}: {exc})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{model}: a fast tokenizer is needed (labels are placed by offset mappings)")
    if tok.eos_token is None:
        raise ModelLoadError(f"{model}: the tokenizer has no EOS token")
    return tok


def load_base_model(model: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
    """Load a causal LM for per-example gradients (eval mode, no dropout, weights frozen)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if os.path.sep in model and not os.path.exists(model):
        raise InputNotFoundError(model, "model directory")
    try:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"{model}: model does not load ({type(exc).__name__}: {exc})") from None
    m.to(resolve_device(device))
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def read_adapter_config(adapter: str) -> dict:
    """Read ``adapter_config.json`` of a peft LoRA adapter directory, with clear errors."""
    cfg_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isdir(adapter):
        raise InputNotFoundError(adapter, "adapter directory")
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{adapter}: not a LoRA adapter (no adapter_config.json)")
    try:
        with open(cfg_path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{cfg_path}: does not load ({exc})") from None
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ModelLoadError(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}, expected 'LORA'")
    return cfg


def attach_adapter(base, adapter: str):
    """Wrap ``base`` in a PeftModel with the adapter at ``adapter`` (LoRA weights trainable, base frozen)."""
    import warnings

    from peft import PeftModel

    read_adapter_config(adapter)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pm = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{adapter}: adapter does not load onto the base model ({type(exc).__name__}: {exc})"
        ) from None
    pm.eval()
    for name, p in pm.named_parameters():
        p.requires_grad_("lora_" in name)
    return pm


def detach_adapter(pm):
    """Undo :func:`attach_adapter`, returning the unmodified base model for the next checkpoint."""
    return pm.unload()


def lora_parameter_names(pm) -> list[str]:
    """Names of the LoRA parameters, in ``named_parameters`` order (the order optimizers and LESS use)."""
    return [n for n, p in pm.named_parameters() if "lora_" in n]


def model_fingerprint(model: str) -> dict:
    """Identify a base model: its name, its hub revision when known, and a hash of its files.

    For a local directory the hash covers every small file (config, tokenizer) in full and, for each large
    weight file, its size and first and last MiB: cheap enough to check at every query, and it changes when the
    weights or the tokenizer are replaced.
    """
    out: dict = {"name": model}
    if not os.path.isdir(model):
        return out
    h = hashlib.sha256()
    for fname in sorted(os.listdir(model)):
        full = os.path.join(model, fname)
        if not os.path.isfile(full):
            continue
        big = os.path.getsize(full) > 64 << 20
        h.update(fname.encode() + sha256_file(full, limit=(1 << 20) if big else None).encode())
    out["hash"] = h.hexdigest()[:32]
    ref = os.path.join(model, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as fh:
            out["revision"] = fh.read().strip()
    return out


def adapter_fingerprint(adapter: str) -> str:
    """Full SHA-256 over an adapter's config and weights (adapters are small)."""
    h = hashlib.sha256()
    for fname in sorted(os.listdir(adapter)):
        if fname == "adapter_config.json" or fname.startswith("adapter_model"):
            h.update(fname.encode() + sha256_file(os.path.join(adapter, fname)).encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------
# Tiny models for tests, the demo and the benchmarks (random weights, tokenizer trained on the spot).
# ---------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
):
    """A small Llama with random weights sized for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def save_model(model, tokenizer, out_dir: str) -> str:
    """Save a model and tokenizer in the usual transformers layout (safetensors)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def new_lora(base, r: int, alpha: float, dropout: float, target_modules: Sequence[str], seed: int = 0):
    """Wrap ``base`` with a fresh LoRA adapter (B initialised to zero, as peft does)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, cfg)
