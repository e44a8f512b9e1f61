"""Reports over a sweep's MLflow runs: pure functions over tidy tables, plotting kept apart."""
