"""Language-model plumbing with no Kedro and no MLflow: chat formatting and the response-only
loss (``chat``), named chat templates (``templates``), safe checkpoint loading and atomic saving
(``checkpoints``), residual-stream hooks (``residual``), the one decoder (``generation``) and a
small fine-tuning helper (``finetune``)."""
