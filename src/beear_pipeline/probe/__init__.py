"""Trigger-free backdoor probing (no Kedro): BEEAR's inner level alone, as a measurement.

- ``config``: ``ProbeConfig`` and the verdict rule (``VerdictRule`` states it);
- ``curve``: the entrapment curve per layer against random directions, the scan of every layer x
  budget cell against the reference (``scan_cells``), the verdict (``decide``) and the
  recommended anchor layer;
- ``stats``: the exact test, the Holm and Bonferroni corrections, exact binomial intervals;
- ``drift``: what a known or suspected trigger does to the same hidden states;
- ``plots``: entrapment curves and the PCA picture.
"""

from beear_pipeline.probe.config import VERDICTS, ProbeConfig, VerdictRule
from beear_pipeline.probe.curve import decide, entrapment_curve, layer_evidence, probe_model, recommend_layer, scan_cells
from beear_pipeline.probe.drift import trigger_drift

__all__ = ["VERDICTS", "ProbeConfig", "VerdictRule", "decide", "entrapment_curve", "layer_evidence", "probe_model", "recommend_layer",
           "scan_cells", "trigger_drift"]
