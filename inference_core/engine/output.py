"""Output processing: from a step's sampled tokens to what each request's stream receives (incremental
text, stop strings, log-probabilities), its final ``Result``, its metrics and its JSON log line. Runs on
the step thread; hands items to each request's event loop once per step."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time

from inference_core.engine.types import Delta, Live, Result, Row, Sampled
from inference_core.redaction import redact_text
from inference_core.scheduler import FinishReason, Request
from inference_core.telemetry import Metrics

Item = tuple[asyncio.Queue[Delta | Result | BaseException], Delta]


def _deliver(items: list[Item]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)  # a chunk, its request, the tokens it computes


class OutputProcessor:
    def __init__(self, metrics: Metrics, logger: logging.Logger, log_text: bool = False) -> None:
        self.metrics = metrics
        self.logger = logger
        self.log_text = log_text  # completions in the log lines (redacted), when asked for

    def emit(self, rows: list[Row], sampled: Sampled) -> set[str]:
        """Stream new text; returns the requests whose output now contains a stop string."""
        now = time.monotonic()
        stopped = set()
        out: dict[asyncio.AbstractEventLoop, list[Item]] = {}
        for _, live, _, _ in rows:
            live.batch_sizes.append(len(rows))
            got = sampled.get(live.req.request_id)
            if got is None:
                continue
            tok, lp = got
            if tok in live.req.eos_ids:
                continue
            self._timing(live, now)
            if lp is not None:
                live.logprobs.append(lp)
                live.pending_logprobs.append(lp)
            live.pending_ids.append(tok)
            stop = self._append(live, live.detok.step(tok))
            if stop:
                stopped.add(live.req.request_id)
            # hold back what a stop string could still take back (nothing once one has ended the text)
            hold = 0 if stop else max((len(x) - 1 for x in live.params.stop), default=0)
            item = self._delta(live, hold)
            if item is not None:
                out.setdefault(live.loop, []).append(item)
        for loop, items in out.items():  # one wake-up of each event loop per step, not one per token
            loop.call_soon_threadsafe(_deliver, items)
        return stopped

    def _timing(self, live: Live, now: float) -> None:
        if not live.first_token_at:
            live.first_token_at = now
            self.metrics.ttft.observe(now - live.arrival)
        else:
            self.metrics.tpot.observe(now - live.last_token_at)
        live.last_token_at = now
        self.metrics.generation_tokens.inc()

    @staticmethod
    def _append(live: Live, new: str) -> bool:
        """Add the new text; True where a stop string now ends it (the text is cut there)."""
        stops = live.params.stop
        cut = -1
        if new and stops and len(live.req.output_ids) + 1 >= live.params.min_tokens:
            tail_from = max(0, len(live.text) - max(len(x) for x in stops) + 1)
            tail = live.text[tail_from:] + new  # a stop string can only end inside the new text
            hits = [tail.find(x) for x in stops if x in tail]
            cut = tail_from + min(hits) if hits else -1
        live.text += new
        if cut >= 0:
            live.text = live.text[:cut]
        return cut >= 0

    @staticmethod
    def _delta(live: Live, hold: int) -> Item | None:
        """The text (and tokens) that may be sent now, less the last ``hold`` characters."""
        upto = max(live.sent_chars, len(live.text) - hold)
        if upto > live.sent_chars or (live.pending_ids and not live.params.stop):
            delta = Delta(live.text[live.sent_chars:upto], live.pending_ids, live.pending_logprobs,
                          None if live.sent_any else live.prompt_logprobs)
            live.sent_any = True
            live.sent_chars = upto
            live.pending_logprobs, live.pending_ids = [], []
            return live.queue, delta
        return None

    def finish(self, live: Live, req: Request) -> None:
        """The rest of the text, then the Result; metrics and the log line."""
        text = live.text
        if len(text) > live.sent_chars or live.pending_logprobs or live.pending_ids:
            live.loop.call_soon_threadsafe(live.queue.put_nowait,
                                           Delta(text[live.sent_chars:], live.pending_ids, live.pending_logprobs,
                                                 None if live.sent_any else live.prompt_logprobs))
        now = time.monotonic()
        reason = (req.finish_reason or FinishReason.STOP).value
        res = Result(req.request_id, text, list(req.output_ids), reason, len(req.prompt_ids),
                     (live.first_token_at or now) - live.arrival, now - live.arrival,
                     round(statistics.fmean(live.batch_sizes), 2) if live.batch_sizes else 0.0,
                     live.logprobs, req.num_cached_tokens, live.prompt_logprobs)
        self.metrics.latency.observe(res.latency_s)
        self.metrics.requests.labels(status="ok").inc()
        live.loop.call_soon_threadsafe(live.queue.put_nowait, res)
        self.log(live, reason, None, res)

    def fail(self, live: Live, error: BaseException, cuda_error: str | None = None) -> None:
        """The request's stream gets ``error``; metrics and the log line."""
        self.metrics.requests.labels(status="error").inc()
        self.metrics.latency.observe(time.monotonic() - live.arrival)
        live.loop.call_soon_threadsafe(live.queue.put_nowait, error)
        self.log(live, "error", cuda_error, error=str(error))

    def log(self, live: Live | None, reason: str, cuda_error: str | None, res: Result | None = None,
            error: str | None = None) -> None:
        if live is None:
            return
        now = time.monotonic()
        fields = {"request_id": live.req.request_id, "inference_time": round((now - live.arrival) * 1000, 3),
                  "batch_size": round(statistics.fmean(live.batch_sizes), 2) if live.batch_sizes else 0,
                  "cuda_error": cuda_error, "prompt_tokens": len(live.req.prompt_ids),
                  "completion_tokens": len(live.req.output_ids), "finish_reason": reason,
                  "cached_tokens": live.req.num_cached_tokens,
                  "ttft_ms": round((live.first_token_at - live.arrival) * 1000, 3) if live.first_token_at else None,
                  "queue_ms": round((live.scheduled_at - live.arrival) * 1000, 3) if live.scheduled_at else None,
                  "preemptions": live.req.num_preemptions}
        if error and not cuda_error:
            fields["error"] = error
        if self.log_text and res is not None:  # asked for; personal data redacted before the line is written
            fields["completion"] = redact_text(res.text)
        failed = cuda_error is not None or error is not None
        self.logger.log(logging.ERROR if failed else logging.INFO,
                        "inference request failed" if failed else "inference request completed",
                        extra={"fields": fields})
