"""Search backends: Optuna locally (``optuna_backend``), Ray Tune on a cluster (``ray_backend``)."""
