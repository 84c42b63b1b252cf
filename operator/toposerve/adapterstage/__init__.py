"""The adapter stager: puts LoRA adapters that vLLM cannot fetch itself on the engine pod's cache.

vLLM 0.33.0's ``/v1/load_lora_adapter`` reads a local directory or downloads a Hugging Face repo
at its default branch (``vllm/lora/utils.py`` get_adapter_absolute_path); an ``https://`` or
``s3://`` source, or a pinned Hugging Face revision, must be on the pod's disk first. The stager
runs next to the engine (a native sidecar, docs/lora.md), downloads such a source once into the
model cache and answers the local directory, which the router then loads.

- ``sources``: pure: source parsing, where a source is staged, archive member checks.
- ``fetch``: the downloads (https archives, S3 prefixes or archives, Hugging Face snapshots).
- ``server``: the HTTP endpoint (``POST /stage``) and the once-per-source bookkeeping.
"""
