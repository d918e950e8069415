"""Generated malformed records never crash the reader with anything but the project's own error."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gist_index.data import read_examples
from gist_index.errors import GistIndexError

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(st.sampled_from(["user", "assistant", "system", "bot"]), values),
        "content": st.one_of(st.text(max_size=30), values),
    },
)
record = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"messages": st.one_of(st.lists(message, max_size=4), values), "id": values, "subtask": values}
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.one_of(st.text(max_size=20), values),
            "completion": st.one_of(st.text(max_size=20), values),
            "id": values,
        },
    ),
    values,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record, min_size=1, max_size=5))
def test_generated_records_give_examples_or_a_project_error(tmp_path, records):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        out = list(read_examples(str(path)))
    except GistIndexError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert len(out) <= len(records)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), gz=st.booleans())
def test_arbitrary_bytes_give_examples_or_a_project_error(tmp_path, raw, gz):
    path = tmp_path / ("fuzz.jsonl.gz" if gz else "fuzz.jsonl")
    path.write_bytes(raw)
    try:
        list(read_examples(str(path)))
    except GistIndexError:
        pass
