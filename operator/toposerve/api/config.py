"""Operator-wide configuration: GPU catalog extensions, price overrides and planning defaults.

Loaded from a YAML file (the Helm chart mounts it from a ConfigMap); every field has a default so
an empty file is a valid config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from toposerve import __version__
from toposerve.api.gpus import DEFAULT_CATALOG, GPUCatalog, GPUType


class OperatorConfig(BaseModel):
    """Cluster-level defaults that LLMDeployment specs may override."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    extra_gpu_types: list[GPUType] = Field(default_factory=list, description="Added to the built-in catalog.")
    hourly_per_gpu: dict[str, float] = Field(
        default_factory=dict, alias="hourlyPerGPU", description="Cluster prices, USD per GPU-hour."
    )
    spot_hourly_per_gpu: dict[str, float] = Field(
        default_factory=dict, alias="spotHourlyPerGPU", description="Cluster spot prices."
    )
    auto_engine: Literal["detect", "vllm", "mock"] = Field(
        default="detect",
        description="What engine 'auto' means: detect (vLLM when the cluster has GPU nodes, else the mock "
        "engine), or always vllm / always mock (e.g. a simulated GPU fleet for demos and CI).",
    )
    default_gpus_per_node: int = Field(default=8, ge=1, description="When neither spec nor inventory says.")
    max_pipeline_parallel: int = Field(
        default=8, ge=1, description="Largest PP (nodes per replica) 'auto' tries."
    )
    max_context_parallel: int = Field(
        default=4, ge=1, description="Largest CP 'auto' tries for long context."
    )
    default_context_length: int = Field(default=8192, ge=1, description="When neither spec nor catalog says.")
    vllm_image: str = Field(default="vllm/vllm-openai:v0.11.0", description="Engine image for engine vllm.")
    toposerve_image: str = Field(
        default=f"ghcr.io/toposerve/toposerve:{__version__}",
        description="The project image (mock engine, router).",
    )
    capacity_type_label: str = Field(
        default="toposerve.io/capacity-type", description="Node label with value spot or on-demand."
    )
    cpu_per_gpu: str = Field(default="4", description="CPU request per GPU of a serving pod.")
    memory_per_gpu: str = Field(default="16Gi", description="Memory request per GPU of a serving pod.")
    mock_cpu: str = Field(default="100m", description="CPU request of a mock-engine pod.")
    mock_memory: str = Field(default="128Mi", description="Memory request of a mock-engine pod.")

    def catalog(self) -> GPUCatalog:
        return DEFAULT_CATALOG.extended(self.extra_gpu_types) if self.extra_gpu_types else DEFAULT_CATALOG

    @classmethod
    def load(cls, path: str | Path | None) -> OperatorConfig:
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)
