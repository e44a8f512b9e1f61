"""The searcher adapter: an Optuna study behind Ray Tune's `Searcher` interface.

Uses public APIs (`ray.tune.search.Searcher`; Optuna's ask-and-tell), so it does not break
when Ray's own `OptunaSearch` changes its internals; the one exception, a frozen trial's
storage id, rebuilds the handles of a restored sweep's running trials (`set_state`). What it
adds to plain ask-and-tell:

- define-by-run sampling of conditional params (`when:`): a param is suggested only when its
  condition holds, so Optuna never learns from values that were not used;
- infeasible samples (a broken constraint, a config the model refuses) are told to Optuna as
  FAIL and resampled, up to `MAX_RESAMPLE` times;
- trials that errored or diverged are told as FAIL, trials stopped by ASHA as PRUNED (their
  per-epoch objective was reported as intermediate values, which TPE uses for pruned trials);
- designs (README "Designs"): `random` samples with a seeded `RandomSampler`; `factorial` and
  `one_at_a_time` enqueue their fixed list of configurations (`spec.design_points`) in the
  Optuna study, which hands them out in order, and the searcher is finished after the last.
"""

from __future__ import annotations

import math
import pickle
import random
from typing import Any, Literal

from ray.tune.search import Searcher

from study.records import Outcome, SweepSpec, TrialReport, rung_epochs
from study.spaces import FEASIBLE_TRIES, infeasible
from study.sweep import journal

MAX_RESAMPLE = 200
# Ray's sentinel for "no more trials" (a str, though `Searcher.suggest` is annotated dict | None)
FINISHED: Any = Searcher.FINISHED


def make_sampler(spec: SweepSpec) -> Any:
    """The Optuna sampler of `spec.searcher`, seeded with `spec.searcher_seed`."""
    import optuna

    s = spec.searcher_seed
    if spec.design != "search" or spec.searcher == "random":  # fixed designs: enqueued trials
        return optuna.samplers.RandomSampler(seed=s)
    if spec.searcher == "cmaes":  # needs the `cmaes` package (a dependency)
        return optuna.samplers.CmaEsSampler(seed=s, warn_independent_sampling=False)
    if spec.searcher == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s, population_size=nsga2_population(spec))
    return optuna.samplers.TPESampler(seed=s, multivariate=True, group=True,
                                      constant_liar=True,
                                      n_startup_trials=tpe_startup(spec.num_trials))


def expected_completed(spec: SweepSpec) -> float:
    """About how many trials train the whole budget: ASHA (Li et al. 2020) keeps a
    1 / reduction_factor share at each rung grace_period x reduction_factor^k below the
    budget; without early stopping, every trial."""
    if not spec.early_stopping:
        return float(spec.num_trials)
    rungs = rung_epochs(spec.grace_period, spec.reduction_factor, spec.epochs)
    return spec.num_trials / spec.reduction_factor ** len(rungs)


def nsga2_population(spec: SweepSpec) -> int:
    """NSGA-II's generation size (Deb et al. 2002): a generation fills with completed trials
    only (those ASHA stops are pruned, which NSGA-II leaves out), so Optuna's default of 50
    would keep a sweep of a few dozen trials in its random first generation: a third of the
    trials expected to complete (3 generations), between 2 and 50."""
    return int(min(50, max(2, expected_completed(spec) // 3)))


def tpe_startup(num_trials: int) -> int:
    """Random start-up trials before TPE models the results: a fifth of the budget, between 3
    and Optuna's default 10 (with the default 10, a 16-trial sweep was 10/16 random search)."""
    return min(10, max(3, num_trials // 5))


def sample_config(spec: SweepSpec, trial: Any) -> dict[str, Any]:
    """Define-by-run: the fixed values plus every param whose condition holds."""
    ctx = dict(spec.fixed)
    for p in spec.params:
        if p.active(ctx):
            ctx[p.name] = p.suggest(trial)
    return ctx


def sampled_params(spec: SweepSpec, config: dict[str, Any]) -> dict[str, Any]:
    """The searched params a configuration holds (those whose condition holds in it)."""
    return {p.name: config[p.name] for p in spec.params if p.active(config) and p.name in config}


class StudySearch(Searcher):
    """An Optuna study (in memory, pickled with the sweep's state) driven by Ray Tune."""

    def __init__(self, spec: SweepSpec) -> None:
        import optuna

        multi = spec.multi_objective
        # Ray accepts lists for multi-objective searchers, though it annotates `str | None`
        metric: Any = [m for m, _ in spec.objectives] if multi else spec.metric
        mode: Any = [d for _, d in spec.objectives] if multi else spec.mode
        super().__init__(metric=metric, mode=mode)
        self.spec = spec
        directions: list[Literal["minimize", "maximize"]] = [
            "maximize" if d == "max" else "minimize" for _, d in spec.objectives]
        self.study = optuna.create_study(directions=directions, sampler=make_sampler(spec))
        self.live: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self._trials: dict[str, Any] = {}  # Ray trial id -> optuna.Trial (this process only)
        self.resampled = 0
        self.replayed: dict[str, int] = {}  # configurations replayed on a resume (`journal`)
        for params in spec.design_points:  # a fixed design: asked in this order
            self.study.enqueue_trial(dict(params))

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True  # the space, metric and mode are the spec's

    def waiting(self) -> int:
        """How many enqueued configurations of a fixed design are still to be suggested."""
        import optuna

        return len(self.study.get_trials(deepcopy=False,
                                         states=(optuna.trial.TrialState.WAITING,)))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """A configuration for the trial. On a resumed sweep, the finished runs the saved state
        never knew (`journal`) are handed out with their runs' reports to replay, each once:
        the sampler, restored with the state, proposes their configurations again in their
        order (a fixed design's list, seeded random draws, TPE's random start-up), between
        those of the unfinished runs it also proposes again (their trials retried). A
        proposal that is neither, while runs wait, means the sampler has left that order (TPE
        that has seen other results): it is told to Optuna as FAIL and the oldest run's
        configuration asked as an enqueued trial instead; the sampler's own later proposal of
        a run taken so, early, is told as FAIL and drawn again (it would train that run's trial
        a second time). A configuration proposed in order is never barred afterwards (a search
        repeats configurations), and each unfinished run's is retried once."""
        import optuna

        fail = optuna.trial.TrialState.FAIL
        for _ in range(MAX_RESAMPLE):
            suggested = self._suggest(trial_id)
            if not isinstance(suggested, dict) or not (journal.pending() or self.replayed):
                return suggested
            key = journal.config_key(suggested)
            offer = journal.take(key)
            if offer is None and self.spec.design_points:
                return suggested  # a fixed design hands out its list in order
            if offer is None and self.replayed.get(key, 0) > 0:
                self.replayed[key] -= 1  # the sampler's own proposal of a run taken early
                if not self.replayed[key]:
                    del self.replayed[key]
                self._trials.pop(trial_id, None)
                self.study.tell(self.live.pop(trial_id), state=fail)
                continue
            if offer is None and (journal.to_retry(key) or not journal.pending()):
                return suggested
            if offer is None:  # the sampler no longer proposes the runs in their order
                offer = journal.take()
                assert offer is not None
                self._trials.pop(trial_id, None)
                self.study.tell(self.live.pop(trial_id), state=fail)
                self.study.enqueue_trial(sampled_params(self.spec, offer.config))
                trial = self.study.ask()
                self.live[trial_id], self._trials[trial_id] = trial.number, trial
                suggested = sample_config(self.spec, trial)
                if journal.config_key(suggested) != offer.key:  # the space no longer gives it
                    return suggested  # (a new trial, never seen so far)
                self.replayed[offer.key] = self.replayed.get(offer.key, 0) + 1
            return journal.with_replay(suggested, offer.run_id, offer.reports)
        raise RuntimeError(f"no configuration but replayed ones in {MAX_RESAMPLE} suggestions")

    def _suggest(self, trial_id: str) -> dict[str, Any] | None:
        import optuna

        fixed_design = bool(self.spec.design_points)
        for _ in range(MAX_RESAMPLE):
            if fixed_design and not self.waiting():
                return FINISHED  # every configuration of the design was handed out
            trial = self.study.ask()
            config = sample_config(self.spec, trial)
            sampled = {k: v for k, v in config.items() if k not in self.spec.fixed}
            if infeasible(self.spec, sampled) is None:
                self.live[trial_id], self._trials[trial_id] = trial.number, trial
                return config
            self.resampled += 1
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        # the sampler keeps proposing where nothing runs (TPE learns nothing from the FAIL
        # trials): a configuration drawn as the space's feasibility check draws them, seeded,
        # enqueued so the study records it
        rng = random.Random(f"{self.spec.searcher_seed}:{len(self.study.trials)}")
        for _ in range(FEASIBLE_TRIES):
            sampled = self.spec.sample(rng)
            if infeasible(self.spec, sampled) is None:
                self.study.enqueue_trial(sampled)
                trial = self.study.ask()
                self.live[trial_id], self._trials[trial_id] = trial.number, trial
                return sample_config(self.spec, trial)
        raise RuntimeError(f"no feasible configuration in {MAX_RESAMPLE} suggestions and "
                           f"{FEASIBLE_TRIES} random draws")

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial = self._trials.get(trial_id)
        value = result.get(self.spec.metric)
        epoch = result.get("epoch")
        if (trial is None or self.spec.multi_objective or not isinstance(value, int | float)
                or not isinstance(epoch, int | float) or not math.isfinite(value)):
            return
        trial.report(float(value), int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        import optuna

        number = self.live.pop(trial_id, None)
        self._trials.pop(trial_id, None)
        if number is None:
            return
        State = optuna.trial.TrialState
        report = TrialReport.from_ray(result)
        if error or report.outcome in (Outcome.ERROR, Outcome.DIVERGED):
            self.study.tell(number, state=State.FAIL)
        elif report.outcome is None:  # stopped by ASHA at its last reported epoch
            self.study.tell(number, state=State.PRUNED)
        else:
            values = [(result or {}).get(m) for m, _ in self.spec.objectives]
            if all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                self.study.tell(number, [float(v) for v in values])  # type: ignore[arg-type]
            else:
                self.study.tell(number, state=State.FAIL)

    def get_state(self) -> dict[str, Any]:
        return {"study": self.study, "live": dict(self.live), "resampled": self.resampled,
                "replayed": dict(self.replayed)}

    def set_state(self, state: dict[str, Any]) -> None:
        import optuna

        self.study, self.live = state["study"], dict(state["live"])
        self.resampled = state.get("resampled", 0)
        replayed = state.get("replayed")  # (a list, or none, in older states: no bans)
        self.replayed = dict(replayed) if isinstance(replayed, dict) else {}
        # handles of the restored live trials, so that their epochs are reported to Optuna
        # again (TPE ranks a pruned trial by its last intermediate value); Optuna builds a
        # Trial from its storage id, which only the frozen trial holds
        frozen = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        self._trials = {tid: optuna.trial.Trial(self.study, frozen[n]._trial_id)
                        for tid, n in self.live.items() if n in frozen}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles the searcher with the tuner; optuna.Trial handles stay in this process
        return {**self.__dict__, "_trials": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"replayed": {}, **state})  # (pickled before it existed)
