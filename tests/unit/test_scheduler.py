"""The continuous-batching scheduler, exhaustively, with hand-made model outputs (no torch)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from inference_core.scheduler import FinishReason, Request, Scheduler, SchedulerConfig, SchedulerOutput, Status

EOS = 0


def create_scheduler(**overrides: Any) -> Scheduler:
    cfg = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "max_model_len": 128, "num_kv_blocks": 64,
           "block_size": 4, **overrides}
    return Scheduler(SchedulerConfig(**cfg))


def create_requests(n: int, prompt_len: int = 10, max_tokens: int = 5, start: int = 0) -> list[Request]:
    return [Request(f"r{i}", list(range(1, prompt_len + 1)), max_tokens, frozenset({EOS}), arrival=float(i))
            for i in range(start, start + n)]


def token_for(req: Request) -> int:
    """A deterministic 'model': the next token depends only on the request and its position."""
    return 100 + (int(req.request_id[1:]) * 7 + req.num_tokens) % 50


def token_for_first(req: Request) -> int:
    return 100 + (int(req.request_id[1:]) * 7 + len(req.prompt_ids)) % 50


def step(s: Scheduler, stopped: tuple[str, ...] = ()) -> tuple[SchedulerOutput, list[Request]]:
    out = s.schedule()
    sampled = {}
    for ch in out.chunks:
        req = s.requests[ch.request_id]
        if ch.start + ch.num_tokens == req.num_tokens:
            sampled[ch.request_id] = token_for(req)
    check_accounting(s)
    return out, s.update(out, sampled, stopped)


def check_accounting(s: Scheduler) -> None:
    for r in s.running:  # after schedule(): blocks cover what this step will have computed
        assert s.blocks.held[r.request_id] >= s.blocks.blocks_for(r.num_computed)
    assert set(s.blocks.held) <= {r.request_id for r in s.running}
    assert s.blocks.num_free >= 0


def run_all(s: Scheduler, max_steps: int = 10_000) -> dict[str, Request]:
    done: dict[str, Request] = {}
    for _ in range(max_steps):
        if not s.has_work:
            return done
        out, finished = step(s)
        assert out.num_batched_tokens <= s.config.max_num_batched_tokens
        assert len(s.running) <= s.config.max_num_seqs
        for r in finished:
            done[r.request_id] = r
    raise AssertionError("did not finish")


def test_decodes_first_then_prefills_within_budget() -> None:
    s = create_scheduler(max_num_batched_tokens=16)
    for r in create_requests(2, prompt_len=10):
        s.add(r)
    out, _ = step(s)
    assert [(c.request_id, c.start, c.num_tokens) for c in out.chunks] == [("r0", 0, 10), ("r1", 0, 6)]
    out, _ = step(s)  # r0 decodes (1 token) before r1's prompt continues (chunked prefill)
    assert [(c.request_id, c.start, c.num_tokens) for c in out.chunks] == [("r0", 10, 1), ("r1", 6, 4)]
    out, _ = step(s)
    assert [(c.request_id, c.num_tokens) for c in out.chunks] == [("r0", 1), ("r1", 1)]


def test_max_num_seqs_and_fcfs() -> None:
    s = create_scheduler(max_num_seqs=2)
    for r in create_requests(3):
        s.add(r)
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"] and [r.request_id for r in s.waiting] == ["r2"]


def test_head_of_queue_is_never_overtaken() -> None:
    s = create_scheduler(num_kv_blocks=32, block_size=4, max_model_len=128, max_num_batched_tokens=256)
    big = Request("r0", list(range(1, 121)), 4, frozenset({EOS}), arrival=0.0)  # 30 blocks
    s.add(big)
    step(s)
    s.add(Request("r1", list(range(200, 219)), 4, arrival=1.0))  # needs 5 blocks; only 2 free
    s.add(Request("r2", [1, 2, 3], 4, arrival=2.0))  # would fit, but must wait behind r1
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["r0"]


def test_stop_conditions() -> None:
    s = create_scheduler()
    a, b, c = create_requests(3, max_tokens=3)
    for r in (a, b, c):
        s.add(r)
    step(s)  # prefill: each request gets its first token
    finished = s.update(s.schedule(), {"r0": EOS, "r1": 5, "r2": 6}, stopped=["r1"])
    assert [r.request_id for r in finished] == ["r0", "r1"]
    assert a.finish_reason == FinishReason.STOP and a.output_ids == [token_for_first(a)]  # EOS is not output
    assert b.finish_reason == FinishReason.STOP and b.output_ids[-1] == 5 and b.status == Status.FINISHED
    done = run_all(s)
    assert done["r2"].finish_reason == FinishReason.LENGTH and len(done["r2"].output_ids) == 3


def test_abort_frees_blocks_and_waiting_requests() -> None:
    s = create_scheduler(max_num_seqs=1)
    a, b = create_requests(2)
    s.add(a)
    s.add(b)
    step(s)
    assert s.abort("r0") is a and a.finish_reason == FinishReason.ABORT
    assert s.blocks.held == {} and s.abort("r0") is None
    assert s.abort("r1") is b and not s.has_work


def test_preemption_by_recompute_gives_the_same_output() -> None:
    reference = run_all(_loaded(create_scheduler(num_kv_blocks=256)))
    tight = _loaded(create_scheduler(num_kv_blocks=12, block_size=4, max_model_len=40))
    got = run_all(tight)
    assert tight.num_preemptions > 0
    assert {k: v.output_ids for k, v in got.items()} == {k: v.output_ids for k, v in reference.items()}
    assert sum(r.num_preemptions for r in got.values()) == tight.num_preemptions


def _loaded(s: Scheduler) -> Scheduler:
    for r in create_requests(4, prompt_len=9, max_tokens=12):
        s.add(r)
    return s


def test_static_batching_admits_only_when_idle() -> None:
    s = create_scheduler(static=True, max_num_seqs=2)
    for r in create_requests(3, max_tokens=3):
        s.add(r)
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["r0", "r1"]
    while any(r.request_id in ("r0", "r1") for r in s.running):
        out, _ = step(s)
        assert "r2" not in [c.request_id for c in out.chunks]
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["r2"]


def test_static_batch_fills_over_several_prefill_steps_then_closes() -> None:
    """Four 10-token prompts and a budget of 16: the batch takes all four (max_num_seqs) over three
    prefill steps, not just the ones the first step's budget held; a fifth waits until the batch is done."""
    s = create_scheduler(static=True, max_num_seqs=4, max_num_batched_tokens=16)
    for r in create_requests(5, prompt_len=10, max_tokens=3):
        s.add(r)
    admitted: set[str] = set()
    while len(admitted) < 4:
        out, _ = step(s)
        admitted |= {c.request_id for c in out.chunks}
        assert "r4" not in admitted
    assert admitted == {"r0", "r1", "r2", "r3"}
    while any(r.request_id != "r4" for r in s.running):
        out, _ = step(s)
        assert "r4" not in [c.request_id for c in out.chunks]
    out, _ = step(s)
    assert [c.request_id for c in out.chunks] == ["r4"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=12),
       st.integers(1, 6), st.integers(4, 48), st.integers(11, 40), st.booleans())
def test_random_workloads_finish_with_exact_accounting(reqs: list[tuple[int, int]], seqs: int, budget: int,
                                                       blocks: int, static: bool) -> None:
    s = create_scheduler(max_num_seqs=seqs, max_num_batched_tokens=budget, num_kv_blocks=blocks, block_size=4,
                         max_model_len=44, static=static)
    for i, (plen, mt) in enumerate(reqs):
        s.add(Request(f"r{i}", list(range(1, plen + 1)), mt, arrival=float(i)))
    done = run_all(s)
    assert len(done) == len(reqs) and s.blocks.held == {}
    for i, (plen, mt) in enumerate(reqs):
        r = done[f"r{i}"]
        assert len(r.output_ids) == min(mt, 44 - plen)
        assert r.output_ids == [100 + (i * 7 + plen + k) % 50 for k in range(len(r.output_ids))]


# -- real blocks and prefix caching -------------------------------------------------------------------


def check_blocks(s: Scheduler) -> None:
    """Every block is free, cached-and-evictable, or held; reference counts equal the tables' entries."""
    b = s.blocks
    held = [blk for t in b.tables.values() for blk in t]
    free, evictable = set(b.free_ids), set(b.evictable)
    assert len(free) == len(b.free_ids) and not free & evictable and not free & set(held)
    assert not evictable & set(held)
    assert free | evictable | set(held) == set(range(b.num_blocks))
    for blk in range(b.num_blocks):
        assert b.refs[blk] == held.count(blk)
    for blk in set(held):  # a block held twice is a shared, full, registered one
        if held.count(blk) > 1:
            assert blk in b.hash_of
    assert {b.cached[h] for h in b.cached} == set(b.hash_of) and all(b.cached[h] == k for k, h in b.hash_of.items())


def test_a_repeated_prompt_reuses_the_cached_blocks() -> None:
    s = create_scheduler(block_size=4)
    s.add(Request("r0", list(range(1, 11)), 3, arrival=0.0))
    step(s)  # r0's prompt (10 tokens: two full blocks) is computed and its full blocks registered
    s.add(Request("r1", list(range(1, 11)) + [77], 3, arrival=1.0))
    out, _ = step(s)
    r1 = next(c for c in out.chunks if c.request_id == "r1")
    assert (r1.start, r1.num_tokens) == (8, 3)  # 8 tokens from the cache, the rest computed
    assert s.blocks.tables["r1"][:2] == s.blocks.tables["r0"][:2]
    assert s.requests["r1"].num_cached_tokens == 8
    assert (s.blocks.num_queried_tokens, s.blocks.num_hit_tokens) == (10 + 11, 8)
    check_blocks(s)
    run_all(s)
    check_blocks(s)
    assert s.blocks.usage == 0.0 and len(s.blocks.evictable) >= 2  # freed, but still cached


def test_a_whole_cached_prompt_still_computes_its_last_token() -> None:
    s = create_scheduler(block_size=4)
    s.add(Request("r0", list(range(1, 9)), 1, arrival=0.0))
    run_all(s)
    s.add(Request("r1", list(range(1, 9)), 1, arrival=1.0))
    out, _ = step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(4, 4)]  # one block from the cache, not two


def test_equal_blocks_after_different_prefixes_do_not_match() -> None:
    s = create_scheduler(block_size=4)
    s.add(Request("r0", [1, 2, 3, 4, 5, 6, 7, 8, 9], 1, arrival=0.0))
    run_all(s)
    s.add(Request("r1", [9, 9, 9, 9, 5, 6, 7, 8, 9], 1, arrival=1.0))  # second block equal, first not
    out, _ = step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(0, 9)]


def test_cached_blocks_are_evicted_when_memory_is_needed() -> None:
    s = create_scheduler(block_size=4, num_kv_blocks=40, max_model_len=40)
    s.add(Request("r0", list(range(1, 33)), 1, arrival=0.0))
    run_all(s)
    assert len(s.blocks.evictable) == 8 and s.blocks.num_free == 40
    s.add(Request("r1", list(range(100, 139)), 1, arrival=1.0))  # 10 blocks: 32 free, then 2 evicted
    run_all(s)
    check_blocks(s)
    assert s.blocks.usage == 0.0 and len(s.blocks.cached) == len(s.blocks.hash_of) <= 8 + 9


def test_prefix_caching_off_computes_everything() -> None:
    s = create_scheduler(block_size=4, enable_prefix_caching=False)
    for i in range(2):
        s.add(Request(f"r{i}", list(range(1, 11)), 1, arrival=float(i)))
        out, _ = step(s)
        assert out.chunks[-1].start == 0
    assert s.blocks.num_hit_tokens == 0 and not s.blocks.cached


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 30), st.integers(1, 10)), min_size=1, max_size=10),
       st.integers(1, 5), st.integers(4, 40), st.integers(11, 40))
def test_shared_prefixes_give_the_outputs_of_no_caching(reqs: list[tuple[int, int, int]], seqs: int, budget: int,
                                                        blocks: int) -> None:
    """Prompts from three families that share prefixes; arrivals interleaved with steps. With and without
    prefix caching the outputs are identical and the block accounting is exact after every step."""
    runs = []
    for caching in (True, False):
        s = create_scheduler(max_num_seqs=seqs, max_num_batched_tokens=budget, num_kv_blocks=blocks, block_size=4,
                             max_model_len=44, enable_prefix_caching=caching)
        done: dict[str, Request] = {}
        for i, (family, plen, mt) in enumerate(reqs):
            s.add(Request(f"r{i}", [family * 50 + k for k in range(1, plen + 1)], mt, arrival=float(i)))
            for _ in range(2):  # a little progress before the next arrival
                if s.has_work:
                    _, fin = step(s)
                    check_blocks(s)
                    done.update((r.request_id, r) for r in fin)
        while s.has_work:
            _, fin = step(s)
            check_blocks(s)
            done.update((r.request_id, r) for r in fin)
        assert s.blocks.usage == 0.0
        runs.append({k: v.output_ids for k, v in done.items()})
    assert runs[0] == runs[1] and len(runs[0]) == len(reqs)


@given(st.integers(0, 6), st.integers(0, 6), st.integers(0, 12), st.integers(0, 12))
def test_tokens_is_a_slice_of_all_ids(plen: int, olen: int, a: int, b: int) -> None:
    r = Request("r", list(range(1, plen + 1)), 5, output_ids=list(range(100, 100 + olen)))
    start, stop = min(a, b), max(a, b)
    assert r.tokens(start, stop) == r.all_ids[start:stop]
