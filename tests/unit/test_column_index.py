"""The local store's column index (DuckDB) answers exactly as the SQLite queries do.

Random events with every JSON type on mapped fields (columns) and unmapped ones (read from the JSON), and
random filters of every kind over both, grouped by mapped and unmapped keys: counts and aggregations from
the index equal the SQLite path's. Then the index's life: fed per batch, caught up from SQLite on open,
rebuilt when deleted, pruned with the store, and left alone (SQLite answers) when another process holds it.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sentinel.logstore.local import LocalLogStore
from sentinel.rules.filters import LogFilter

T0 = 1_800_000_000.0
VALUES: dict[str, list[Any]] = {
    "replica": ["r0", "r1", "r2", 3, None],
    "level": ["info", "error", "warn"],
    "cuda_error": ["CUDA error: an illegal memory access", "CUDA error: out of memory", None, 7],
    "inference_time": [12.5, 600, 700.25, 1e3, "slow", True, None, 0],
    "batch_size": [1, 2.5, 3.0, 4, False],
    "finish_reason": ["stop", "length", "abort"],
    "model": ["v1", "v2", 2, True, {"a": 1}, [1, 2], 2.0, None],       # not mapped: read from the JSON
    "extra": [1, 2, 3.5, -4, "x", None, 10**6],                          # not mapped
    "message": ["inference request completed", "inference request failed", "a[b]c*"],
}


def events(n: int, seed: int) -> list[tuple[float, dict[str, Any]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        doc = {k: rng.choice(v) for k, v in VALUES.items() if rng.random() < 0.85}
        out.append((T0 + i * 0.5, doc))
    return out


def random_filter(rng: random.Random) -> dict[str, Any]:
    field = rng.choice(list(VALUES))
    kind = rng.choice(["exists", "term", "terms", "range", "wildcard", "query_string"])
    scalars = [v for v in VALUES[field] if isinstance(v, str | int | float | bool) and v is not None]
    if kind == "exists":
        return {"exists": field}
    if kind == "term":
        return {"term": {field: rng.choice(scalars + [1, 2.5, "r1"])}}
    if kind == "terms":
        return {"terms": {field: rng.sample(scalars, k=min(2, len(scalars)))}}
    if kind == "range":
        bound: Any = rng.choice([0, 3, 100.5, 650, "m", "r1"])
        return {"range": {field: {rng.choice(["gt", "gte", "lt", "lte"]): bound}}}
    if kind == "wildcard":
        return {"wildcard": {field: rng.choice(["r*", "*fail?d", "v?", "a*c*", "*"])}}
    return {"query_string": rng.choice(["cuda_error:* AND NOT replica:r0", "level:error || batch_size:<3",
                                        "inference_time:[500 TO *] AND -finish_reason:stop", "_exists_:model",
                                        "NOT _exists_:extra OR extra:>2", "model:v1 OR replica:(r1 OR r2)"])}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalLogStore, LocalLogStore]:
    work = tmp_path_factory.mktemp("column-index")
    plain, indexed = LocalLogStore(work / "a.db"), LocalLogStore(work / "b.db", column_index=True)
    assert plain.index is None and indexed.index is not None
    data = events(3000, seed=7)
    for i in range(0, len(data), 700):  # several batches: the ids stay in step
        plain.add(data[i:i + 700])
        indexed.add(data[i:i + 700])
    return plain, indexed


@pytest.mark.parametrize("seed", range(6))
def test_counts_and_aggregations_equal_the_sqlite_path(stores: tuple[LocalLogStore, LocalLogStore],
                                                       seed: int) -> None:
    plain, indexed = stores
    rng = random.Random(seed)
    keys = [[], ["replica"], ["model"], ["batch_size"], ["replica", "model"], ["extra", "level"]]
    compared = nonempty = 0
    for _ in range(40):
        filters = [LogFilter.model_validate(random_filter(rng)) for _ in range(rng.randint(0, 2))]
        since = T0 + rng.uniform(-10, 1200)
        until = since + rng.uniform(1, 600)
        qk = rng.choice(keys)
        want = sorted(plain.count(filters, since, until, qk), key=lambda x: sorted(x[0].items()))
        got = sorted(indexed.count(filters, since, until, qk), key=lambda x: sorted(x[0].items()))
        assert got == want, (filters, qk)
        compared += 1
        nonempty += bool(want)
        field = rng.choice(["inference_time", "extra", "batch_size", "model"])
        agg = rng.choice(["min", "max", "avg", "sum", "value_count", "cardinality", "percentiles"])
        p, method = rng.choice([50, 90, 99, 99.9]), rng.choice(["tdigest", "hdr"])
        want_a = dict((tuple(sorted(k.items())), v) for k, v in plain.aggregate(filters, since, until, qk, field, agg,
                                                                                    p, method))
        got_a = dict((tuple(sorted(k.items())), v) for k, v in indexed.aggregate(filters, since, until, qk, field, agg,
                                                                                   p, method))
        assert got_a.keys() == want_a.keys(), (filters, qk, field, agg)
        for k, v in want_a.items():
            assert got_a[k] == pytest.approx(v, rel=1e-12, abs=1e-9), (filters, qk, field, agg, p, method, k)
    assert nonempty > compared // 3  # the comparison is mostly of non-empty answers


def test_the_index_follows_the_store(tmp_path: Path) -> None:
    data = events(500, seed=3)
    store = LocalLogStore(tmp_path / "logs.db", column_index=True)
    store.add(data[:200])
    store.close()
    plain = LocalLogStore(tmp_path / "logs.db")  # a process without the index (the CLI) adds nothing, reads
    assert plain.count([], 0, T0 + 1e6) == [({}, 200)]
    plain.close()
    store = LocalLogStore(tmp_path / "logs.db", column_index=True)
    store.add(data[200:])
    assert store.index is not None and store.index.max_id() == 500 and store.count([], 0, T0 + 1e6) == [({}, 500)]
    store.prune(T0 + 100)  # both copies pruned: 200 events before T0 + 100
    assert store.count([], 0, T0 + 1e6) == [({}, 300)]
    assert LocalLogStore(tmp_path / "logs.db").count([], 0, T0 + 1e6) == [({}, 300)]
    store.close()
    (tmp_path / "logs.duckdb").unlink()  # lost: rebuilt from the store on open
    store = LocalLogStore(tmp_path / "logs.db", column_index=True)
    assert store.index is not None and store.index.count([], 0, T0 + 1e6) == [({}, 300)]
    # another process holding the index: this one answers from SQLite, the same
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, duckdb; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / "other.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        other = LocalLogStore(tmp_path / "other.db", column_index=True)
        assert other.index is None
        other.add(data[:10])
        assert other.count([], 0, T0 + 1e6) == [({}, 10)]
    finally:
        holder.kill()
        holder.wait()
