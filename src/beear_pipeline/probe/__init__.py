"""Trigger-free backdoor probing (no Kedro): BEEAR's inner level alone, as a measurement.

- ``config``: ``ProbeConfig`` and the verdict rule;
- ``curve``: the entrapment curve per layer against random directions, the verdict and the
  recommended anchor layer;
- ``drift``: what a known or suspected trigger does to the same hidden states;
- ``plots``: entrapment curves and the PCA picture.
"""

from beear_pipeline.probe.config import VERDICTS, ProbeConfig, VerdictRule
from beear_pipeline.probe.curve import entrapment_curve, layer_evidence, probe_model, recommend_layer
from beear_pipeline.probe.drift import trigger_drift

__all__ = ["VERDICTS", "ProbeConfig", "VerdictRule", "entrapment_curve", "layer_evidence", "probe_model", "recommend_layer",
           "trigger_drift"]
