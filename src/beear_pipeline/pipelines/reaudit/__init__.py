from .pipeline import create_gather_pipeline, create_pipeline, create_prepare_pipeline, create_version_pipeline

__all__ = ["create_gather_pipeline", "create_pipeline", "create_prepare_pipeline", "create_version_pipeline"]
