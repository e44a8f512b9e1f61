"""Sweeps: Ray Tune + Optuna + ASHA, tracked in MLflow from the driver, one module per concern.

- `lifecycle`: start (`run_sweep`), resume (`resume_sweep`), finish; Ray start-up and the
  process state a sweep changes, restored when it returns;
- `searcher`: the Optuna study behind Ray's `Searcher` interface (public APIs only);
- `callbacks`: the driver callback that logs every trial to MLflow (`TrackingCallback`);
- `journal`: finished trials that Ray's last saved state missed, replayed from MLflow on resume;
- `progress`: the console progress view (`ProgressView`).
"""

from study.sweep.lifecycle import DEFAULT_STORAGE, finish, override, resume_sweep, run_sweep

__all__ = ["DEFAULT_STORAGE", "finish", "override", "resume_sweep", "run_sweep"]
