"""The engine, in vLLM v1's and nano-vllm's shape:

- ``core.Engine``: requests in from the event loop, the step loop (schedule → run → process outputs),
  health and load;
- ``runner.ModelRunner``: the model on its devices, the CPU kernels and the weights' move into huge pages,
  the memory plan, the KV pool and CUDA graphs, one forward pass with sampling;
- ``output.OutputProcessor``: detokenize, stop strings, log-probabilities, each stream's items, the
  request's metrics and log line;
- ``types``: the configuration, errors and what a request streams back.
"""

from inference_core.engine.core import Engine
from inference_core.engine.runner import ModelRunner, accelerate_all
from inference_core.engine.types import (
    Delta,
    EngineConfig,
    EngineError,
    EngineUnhealthy,
    InvalidRequest,
    QueueFull,
    RequestFailed,
    Result,
)
from inference_core.sampling import SamplingParams

__all__ = ["Delta", "Engine", "EngineConfig", "EngineError", "EngineUnhealthy", "InvalidRequest", "ModelRunner",
           "QueueFull", "RequestFailed", "Result", "SamplingParams", "accelerate_all"]
