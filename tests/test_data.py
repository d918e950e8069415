"""Reading data: the two formats, ids, sub-tasks, label masks, truncation, and a one-line error for every kind of
bad input (file, line, field) with a non-zero exit from the CLI."""

import gzip
import json
import os

import numpy as np
import pytest

from gist_index.cli import main
from gist_index.data import encode, load_examples, parse_example, read_examples
from gist_index.errors import DataError, InputNotFoundError
from gist_index.model import load_tokenizer

from conftest import make_records, write_jsonl


def test_messages_render_in_tulu_format_with_loss_on_assistant_only(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ex = parse_example(
        {
            "messages": [
                {"role": "system", "content": " sys "},
                {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "no "},
            ]
        },
        "f.jsonl",
        3,
    )
    text = "".join(t for t, _ in ex.segments)
    assert text == "<|system|>\nsys\n<|user|>\nhi there\n<|assistant|>\nyes</s>\n<|user|>\nand?\n<|assistant|>\nno</s>"
    assert ex.id == "f.jsonl:3" and ex.subtask is None
    enc = encode(ex, tok, 512)
    labelled = tok.decode(enc.input_ids[enc.label_mask], skip_special_tokens=False)
    assert labelled.replace(" ", "") == "yes</s>no</s>"
    assert enc.input_ids[0] == tok.bos_token_id and not enc.label_mask[0]


def test_prompt_completion_format(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ex = parse_example({"id": 17, "prompt": "Q: two plus two", "completion": "four", "subtask": "math"}, "p.jsonl", 1)
    assert "".join(t for t, _ in ex.segments) == "Q: two plus two four</s>"
    assert ex.id == "17" and ex.subtask == "math"
    enc = encode(ex, tok, 512)
    assert tok.decode(enc.input_ids[enc.label_mask]).strip().replace(" ", "") == "four</s>"


def test_truncation_keeps_the_start_and_can_remove_every_label(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ex = parse_example(
        {"messages": [{"role": "user", "content": "cat " * 200}, {"role": "assistant", "content": "dog"}]}, "t.jsonl", 1
    )
    enc = encode(ex, tok, 32)
    assert enc.n_tokens == 32 and enc.truncated and enc.n_label_tokens == 0
    full = encode(ex, tok, 10_000)
    np.testing.assert_array_equal(full.input_ids[:32], enc.input_ids)


def test_gzip_and_plain_files_read_the_same(tmp_path):
    recs = make_records(12, seed=4, subtasks=("a", "b"))
    plain = write_jsonl(tmp_path / "x.jsonl", recs)
    gz = write_jsonl(tmp_path / "x.jsonl.gz", recs, gz=True)
    a, b = list(read_examples(plain)), list(read_examples(gz))
    assert [e.segments for e in a] == [e.segments for e in b]
    assert [e.subtask for e in a] == ["a", "b"] * 6


BAD = [
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant"', None, "not valid JSON"),
    ('{"messages": []}', "messages", "non-empty list"),
    ('{"id": "q"}', "messages", "missing"),
    ('{"messages": "hello"}', "messages", "non-empty list"),
    (
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
        "messages[0].role",
        "unknown role 'robot'",
    ),
    (
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
        "messages[0].content",
        "must be a string",
    ),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "messages", "no assistant message"),
    ('{"prompt": "p"}', "completion", "missing"),
    ('{"prompt": "p", "completion": "  "}', "completion", "empty"),
    (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": [1]}',
        "id",
        "string or an integer",
    ),
    ("[1, 2]", None, "expected a JSON object"),
]


@pytest.mark.parametrize("line,field,message", BAD)
def test_bad_record_names_file_line_and_field(tmp_path, line, field, message):
    good = json.dumps(make_records(1)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + good + "\n" + line + "\n")
    with pytest.raises(DataError) as exc:
        list(read_examples(str(path)))
    err = exc.value
    assert err.path == str(path) and err.line == 4 and err.field == field
    assert message in str(err) and "\n" not in str(err)
    assert str(err).startswith(f"{path}:4: ")


def test_undecodable_bytes_are_a_data_error(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(make_records(1)[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: cannot be read"):
        list(read_examples(str(path)))


def test_missing_file_and_empty_target(tmp_path):
    with pytest.raises(InputNotFoundError) as exc:
        list(read_examples(str(tmp_path / "nope.jsonl")))
    assert isinstance(exc.value, FileNotFoundError) and "nope.jsonl: data file does not exist" in str(exc.value)
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt") as fh:
        fh.write("\n")
    with pytest.raises(DataError, match="hold no examples"):
        load_examples([str(empty)], what="target")


def _cli_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) >= 1 and err[-1].startswith("gist-index: error: ")
    return err[-1]


def test_cli_errors_are_one_line_and_nonzero(capsys, tmp_path, tiny_model_dir, tiny_adapters, pool_file, target_file):
    bad = tmp_path / "pool.jsonl"
    bad.write_text(open(pool_file).read() + '{"messages": [{"role": "user", "content": "q"}]}\n')
    out = str(tmp_path / "s.gist")
    base = [
        "build",
        "--model",
        tiny_model_dir,
        "--adapter",
        *tiny_adapters,
        "--out",
        out,
        "--dim",
        "16",
        "--max-length",
        "64",
        "--no-progress",
        "-q",
    ]
    msg = _cli_error(capsys, base + ["--data", str(bad)])
    assert f"{bad}:41: field 'messages': has no assistant message" in msg
    assert not os.path.exists(out)  # nothing half-written is left
    msg = _cli_error(capsys, base + ["--data", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl: data file does not exist" in msg
    msg = _cli_error(
        capsys,
        [
            "build",
            "--model",
            str(tmp_path / "no-model"),
            "--adapter",
            *tiny_adapters,
            "--out",
            out,
            "--data",
            pool_file,
            "--no-progress",
            "-q",
        ],
    )
    assert "no-model" in msg
    notanadapter = tmp_path / "adapter"
    notanadapter.mkdir()
    msg = _cli_error(
        capsys,
        [
            "build",
            "--model",
            tiny_model_dir,
            "--adapter",
            str(notanadapter),
            "--out",
            out,
            "--data",
            pool_file,
            "--no-progress",
            "-q",
        ],
    )
    assert "not a LoRA adapter (no adapter_config.json)" in msg
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    msg = _cli_error(
        capsys,
        [
            "build",
            "--model",
            str(broken),
            "--adapter",
            *tiny_adapters,
            "--out",
            out,
            "--data",
            pool_file,
            "--no-progress",
            "-q",
        ],
    )
    assert "does not load" in msg
    assert not os.path.exists(out)
    msg = _cli_error(
        capsys,
        [
            "select",
            "--index",
            str(tmp_path / "nostore"),
            "--target",
            target_file,
            "--out",
            str(tmp_path / "o.jsonl"),
            "--top",
            "3",
            "-q",
        ],
    )
    assert "no gist_index store here" in msg
    msg = _cli_error(
        capsys,
        [
            "select",
            "--index",
            str(tmp_path),
            "--target",
            target_file,
            "--out",
            str(tmp_path / "o.jsonl"),
            "--top",
            "3",
            "--fraction",
            "0.1",
            "-q",
        ],
    )
    assert "exactly one of --top N or --fraction F" in msg
