"""The model: its configuration (``config``), the safetensors files (``checkpoint``), loading them mapped
and moving them into huge pages (``weights``), the transformer itself (``transformer``: Qwen2 and Llama
architectures, the packed forward over the paged KV cache), weight-only int8 (``quantize``), and layers
placed over devices and disk (``placement``)."""
