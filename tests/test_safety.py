"""Safe loading: nothing in a store is pickled, optimizer states load without unpickling code, and model code
from a repository runs only when the user asks (trust_remote_code)."""

import os
import pickle
import shutil

import pytest

from gist_index import BuildConfig, build
from gist_index.errors import ModelLoadError
from gist_index.extract import CheckpointedModel, load_adam_state


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_optimizer_state_is_loaded_without_running_pickled_code(tmp_path, tiny_model_dir, tiny_adapters):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_adapters[0], ckpt)
    marker = tmp_path / "pwned"
    with open(ckpt / "optimizer.pt", "wb") as fh:
        pickle.dump({"state": Exploit(str(marker))}, fh)
    cm = CheckpointedModel(tiny_model_dir, [str(ckpt)], device="cpu")
    with pytest.raises(ModelLoadError, match="optimizer state does not load"):
        load_adam_state(str(ckpt), cm.params, "cpu")
    assert not marker.exists()


def test_store_holds_no_pickles(tmp_path, tiny_model_dir, tiny_adapters, pool_file):
    out = str(tmp_path / "s.gist")
    build(
        tiny_model_dir,
        tiny_adapters,
        [pool_file],
        out,
        BuildConfig(dim=16, max_length=64, chunk_rows=16),
        progress=False,
    )
    for root, _, files in os.walk(out):
        for f in files:
            head = open(os.path.join(root, f), "rb").read(2)
            assert not head.startswith(b"\x80"), f"{f} looks like a pickle"


def test_remote_code_runs_only_when_asked(monkeypatch, tiny_model_dir):
    import transformers

    from gist_index.model import load_base_model, load_tokenizer

    seen = []
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def spy(real):
        def f(*a, **kw):
            seen.append(kw.get("trust_remote_code"))
            return real(*a, **kw)

        return f

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tok))
    load_tokenizer(tiny_model_dir)
    load_base_model(tiny_model_dir)
    assert seen == [False, False]
    load_base_model(tiny_model_dir, trust_remote_code=True)
    assert seen[-1] is True
