"""The LLMDeployment API: pydantic models (the single source of truth), CRD generation and catalogs."""
