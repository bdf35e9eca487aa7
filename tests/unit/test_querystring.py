"""query_string: the Lucene subset both log stores answer alike (parity with Elasticsearch itself is in
tests/integration/test_elasticsearch_shipping.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sentinel.logstore.local import LocalLogStore
from sentinel.rules.filters import LogFilter
from sentinel.rules.querystring import QueryStringError, parse


@pytest.mark.parametrize(("query", "tree"), [
    ("replica:r0", ("leaf", {"term": {"replica": "r0"}})),
    ("batch_size:4", ("leaf", {"terms": {"batch_size": [4, "4"]}})),
    ("inference_time:0.5", ("leaf", {"terms": {"inference_time": [0.5, "0.5"]}})),
    ('message:"CUDA error: *"', ("leaf", {"term": {"message": "CUDA error: *"}})),
    ("message:*fail?d", ("leaf", {"wildcard": {"message": "*fail?d"}})),
    ("message:a\\ b*", ("leaf", {"wildcard": {"message": "a b*"}})),
    ("host.name:gpu-node-1", ("leaf", {"term": {"host.name": "gpu-node-1"}})),
    ("url:a\\:b", ("leaf", {"term": {"url": "a:b"}})),
    ("cuda_error:*", ("leaf", {"exists": "cuda_error"})),
    ("_exists_:cuda_error", ("leaf", {"exists": "cuda_error"})),
    ("batch_size:[2 TO 8}", ("leaf", {"range": {"batch_size": {"gte": 2, "lt": 8}}})),
    ("inference_time:{* TO 0.5]", ("leaf", {"range": {"inference_time": {"lte": 0.5}}})),
    ("level:[a TO m]", ("leaf", {"range": {"level": {"gte": "a", "lte": "m"}}})),
    ("inference_time:>=500", ("leaf", {"range": {"inference_time": {"gte": 500}}})),
    ("inference_time:<500", ("leaf", {"range": {"inference_time": {"lt": 500}}})),
    ("replica:(r0 OR r1 OR \"r 2\")", ("leaf", {"terms": {"replica": ["r0", "r1", "r 2"]}})),
    ("a:1 AND b:x OR c:y", ("or", [("and", [("leaf", {"terms": {"a": [1, "1"]}}), ("leaf", {"term": {"b": "x"}})]),
                                   ("leaf", {"term": {"c": "y"}})])),
    ("a:x OR b:y AND c:z", ("or", [("leaf", {"term": {"a": "x"}}),
                                   ("and", [("leaf", {"term": {"b": "y"}}), ("leaf", {"term": {"c": "z"}})])])),
    ("NOT a:x AND -b:y", ("and", [("not", ("leaf", {"term": {"a": "x"}})), ("not", ("leaf", {"term": {"b": "y"}}))])),
    ("!(a:x || b:y) && c:z", ("and", [("not", ("or", [("leaf", {"term": {"a": "x"}}), ("leaf", {"term": {"b": "y"}})])),
                                      ("leaf", {"term": {"c": "z"}})])),
    ("ANDROID:x", ("leaf", {"term": {"ANDROID": "x"}})),
])
def test_parses(query: str, tree: object) -> None:
    assert parse(query) == tree


@pytest.mark.parametrize(("query", "column", "words"), [
    ("CUDA", 1, "has no field"),
    ("a:x b:y", 5, "join terms with AND or OR"),
    ("a:x AND", 8, "missing at the end"),
    ("(a:x", 5, "not closed"),
    ("a:x)", 4, "without a matching"),
    ("a:b~2", 4, "fuzzy"),
    ("a:x^2", 4, "boosts"),
    ("a:/re/", 3, "regular expressions"),
    ("+a:x", 1, "write AND"),
    ("a:", 3, "value is missing"),
    ('a:"open', 3, "quote is not closed"),
    ("a:[1 TO 2", 3, "not closed"),
    ("a:[1 2]", 6, "[low TO high]"),
    ("a:(x AND y)", 6, "joined with OR"),
    ("a:b\\*c*", 3, "literal"),
    ("a*:x", 1, "has no field"),
    ("", 1, "empty"),
    ("(" * 40 + "a:x" + ")" * 40, 33, "nested deeper"),
])
def test_refuses_with_the_column(query: str, column: int, words: str) -> None:
    with pytest.raises(QueryStringError) as exc:
        parse(query)
    assert f"column {column}:" in str(exc.value) and words in str(exc.value)


def test_elastalert_form_and_field_validation() -> None:
    assert LogFilter.model_validate({"query_string": {"query": "a:x"}}).tree == ("leaf", LogFilter(term={"a": "x"}))
    with pytest.raises(ValidationError, match="takes a string"):
        LogFilter.model_validate({"query_string": {"query": "a:x", "default_field": "message"}})
    with pytest.raises(ValidationError, match="exactly one"):
        LogFilter.model_validate({"query_string": "a:x", "exists": "b"})


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab:*?()[]{}"\\ -!&|<>=TOANDRNOT019._~^/+')), max_size=40))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        parse(text)
    except QueryStringError:
        return
    LogFilter(query_string=text)  # whatever parses makes valid filters


def test_not_of_a_missing_field_holds_in_the_local_store(tmp_path: Path) -> None:
    store = LocalLogStore(tmp_path / "l.db")
    store.add([(1.0, {"replica": "r0", "n": 1}), (2.0, {"n": 2}), (3.0, {"replica": "r1", "n": "3"})])
    def hits(q: str) -> list[object]:
        return sorted((d["n"] for d in store.search([LogFilter(query_string=q)], 0, 10)), key=str)
    assert hits("NOT replica:r0") == [2, "3"]
    assert hits("NOT replica:* OR n:3") == [2, "3"]
    assert hits("n:[2 TO *]") == [2]              # numbers compare with numbers only
    assert hits("n:(1 OR 3)") == [1, "3"]         # an unquoted number matches the number or its text
