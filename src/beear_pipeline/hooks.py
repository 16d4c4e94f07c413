"""Project hooks."""

from __future__ import annotations

import dataclasses

from kedro.framework.hooks import hook_impl

from beear_pipeline.tracking import log_params


class TypedParametersHook:
    """Log typed parameters (dataclasses such as ``BeearConfig``) field by field, as
    ``beear.anchor_layer`` etc.: kedro-mlflow flattens plain mappings only."""

    @hook_impl
    def before_node_run(self, node, inputs) -> None:
        for name, value in inputs.items():
            if name.startswith("params:") and dataclasses.is_dataclass(value):
                log_params({f"{name.removeprefix('params:')}.{k}": v for k, v in dataclasses.asdict(value).items()})
