"""Evaluation (no Kedro): the protocol (``protocol``), judges (``judges``), rates and intervals
(``rates``), the evaluation of one model and the re-poisoning check (``evaluate``), utility on
lm-evaluation-harness tasks (``lm_eval``), the report (``report``) and the typed configuration
(``config``)."""
