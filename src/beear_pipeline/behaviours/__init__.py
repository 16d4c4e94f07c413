"""Behaviour data (no Kedro): the schema and readers of users' files (``files``), the Great
Expectations checks (``validation``), generated refusals and benign tasks (``generated``), and
the typed configuration (``config``)."""
