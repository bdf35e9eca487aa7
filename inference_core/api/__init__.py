"""The replica's HTTP API: one router per endpoint family, composed by ``app.create_app``.

- ``ops``: /health, /ready, /load, /metrics, /admin/* (what supervisors, balancers and drills call);
- ``completions``: /v1/models, /v1/completions, /v1/chat/completions (OpenAI's API, vLLM's extensions);
- ``guard``: authentication, rate, concurrency and size limits in front of /v1/*;
- ``slot``: the engine once loaded (a 503 before), ``schemas``: the request bodies and error shapes.

``inference_core.client`` holds the documents the ops routes answer with.
"""
