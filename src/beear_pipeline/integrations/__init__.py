"""The only code outside ``pipelines/`` that imports Kedro or MLflow: Kedro datasets for
checkpoints and tensors (``kedro_datasets``), the project's Kedro hooks (``kedro_hooks``), MLflow
logging that is a no-op outside a run (``tracking``), and the MLflow model registry
(``registry``)."""
