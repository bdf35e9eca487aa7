"""schemathesis hooks for the API fuzzing test (tests/integration/test_api_fuzzing.py).

Two rules of POST /api/v1/silences cannot be stated in a JSON schema, so schemathesis's "schema-valid
request rejected" check would flag their (correct) 400s: a silence must end in the future (Alertmanager
refuses a silence that ends in the past too), and a regex matcher must compile. Generated bodies that are
otherwise valid are moved into the future and given compilable regexes; everything else is left as drawn
(invalid bodies stay invalid). Requests to the model API name the served model ($FUZZ_MODEL)."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import schemathesis


def _ts(v: Any) -> float | None:
    if not isinstance(v, str):
        return None
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    op = ctx.operation
    if op is not None and op.path.startswith("/v1/") and isinstance(body, dict) and isinstance(body.get("model"), str):
        # the served model's name, so requests reach the engine instead of stopping at 404 (model not found),
        # and prompts and lengths inside its context (512 tokens; a longer one is a correct 400 the schema cannot
        # state, since it depends on the model)
        body = {**body, "model": os.environ.get("FUZZ_MODEL", body["model"])}
        for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if isinstance(body.get(key), int | float) and not isinstance(body[key], bool):
                body[key] = min(body[key], 8)
        # only bodies that are otherwise valid are reshaped: a mutated (invalid) item must not be cut away
        prompt = body.get("prompt")
        vocab = int(os.environ.get("FUZZ_VOCAB", "512"))
        if isinstance(prompt, str):
            body["prompt"] = prompt[:100]
        elif isinstance(prompt, list) and all(isinstance(t, int | float) and not isinstance(t, bool) and t >= 0
                                              and float(t).is_integer() for t in prompt):
            body["prompt"] = [int(t) % vocab for t in prompt[:100]]  # token ids exist only below the vocabulary size
        stops = body.get("stop_token_ids")
        if isinstance(stops, list) and all(isinstance(t, int | float) and not isinstance(t, bool) and t >= 0
                                           and float(t).is_integer() for t in stops):
            body["stop_token_ids"] = [int(t) % vocab for t in stops]
        messages = body.get("messages")
        roles = {"system", "user", "assistant", "tool", "developer"}
        if isinstance(messages, list) and all(isinstance(m, dict) and m.get("role") in roles and isinstance(
                m.get("content"), str) for m in messages):
            body["messages"] = [{**m, "content": m["content"][:100]} for m in messages[:4]]
        if body.get("top_logprobs") is not None and body.get("logprobs") in (None, False):
            body["logprobs"] = True  # OpenAI's rule: top_logprobs needs logprobs
        return body
    if op is None or op.path != "/api/v1/silences" or op.method.upper() != "POST" or not isinstance(body, dict):
        return body
    ends, starts = _ts(body.get("endsAt")), _ts(body.get("startsAt"))
    if ends is not None and (ends <= time.time() + 60 or (starts is not None and starts >= ends)):
        body = {**body, "endsAt": datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()}
        if starts is not None:
            body["startsAt"] = datetime.fromtimestamp(time.time(), UTC).isoformat()
    matchers = body.get("matchers")
    if isinstance(matchers, list):
        fixed = []
        for m in matchers:
            hit = re.match(r'^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~)\s*"((?:[^"\\]|\\.)*)"\s*$', m) \
                if isinstance(m, str) else None
            if hit is not None:
                try:
                    re.compile(re.sub(r"\\(.)", r"\1", hit.group(3)))
                except re.error:
                    m = f'{hit.group(1)}=~"x"'
            fixed.append(m)
        body = {**body, "matchers": fixed}
    return body
