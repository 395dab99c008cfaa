"""When a sweep stops trials early: ASHA on training images seen, and a line for each of its rung decisions.

ASHA judges a trial at each rung (after grace_epochs' worth of images, then reduction_factor times as many,
...) against the trials that reached that rung before it: below the top 1/reduction_factor of them, it stops.
Counting images rather than epochs judges a trial on 30% of the data after as many images as one on all of it.
Each decision is printed as it is taken, among the trial's other events:

    trial 3f2a91c0 at rung 1 (1 epoch of images): val_accuracy 0.4123, cutoff 0.3800 over 4 trials: continues
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from asl_tune.sweep import progress
from asl_tune.sweep.space import SearchSpace

FINAL_KEY = "test_accuracy"  # in a trial's last report only: the trainer's final evaluation on the test split


def scheduler(space: SearchSpace, n_train: int):
    """ASHA on training images seen, or FIFO when the space turns early stopping off or its first rung is its last."""
    max_t = space.max_epochs() * space.max_fraction() * n_train
    grace = min(space.grace_epochs * n_train, max_t)
    if not space.early_stopping or grace >= max_t:
        return FIFOScheduler()
    return AnnouncedASHA(
        n_train,
        time_attr="images_seen",
        metric=space.metric,
        mode=space.mode,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=space.reduction_factor,
        stop_last_trials=False,  # a trial at max_t finishes its own last epoch and final evaluation
    )


def _epochs(images: float, n_train: int) -> str:
    epochs = images / n_train
    return f"{epochs:g} epoch{'' if epochs == 1 else 's'} of images"


class AnnouncedASHA(ASHAScheduler):
    """Ray's ASHA, unchanged in what it decides; each rung decision is also printed as a trial event."""

    def __init__(self, n_train: int, **asha):
        super().__init__(**asha)
        self.n_train = n_train  # images in one epoch of the full training split, to say where a rung is

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        bracket = self._trial_info.get(trial.trial_id)
        if bracket is None:
            return super().on_trial_result(tune_controller, trial, result)
        # The rungs this trial has not reached yet, with the cutoff it will be judged against at each, before ASHA records it.
        ahead = {
            milestone: (bracket.cutoff(recorded), len(recorded)) for milestone, recorded in bracket._rungs if trial.trial_id not in recorded
        }
        action = super().on_trial_result(tune_controller, trial, result)
        if FINAL_KEY in result:  # the trial's last report (its test evaluation): it ends now whatever ASHA says
            return action
        rungs = [milestone for milestone, _ in reversed(bracket._rungs)]  # ASHA keeps them highest first
        for milestone, recorded in bracket._rungs:
            if (
                milestone in ahead and trial.trial_id in recorded and milestone < self._max_t
            ):  # at max_t the trial is done: nothing to decide
                self._announce(trial.trial_id, rungs.index(milestone) + 1, milestone, result, *ahead[milestone], action)
        return action

    def _announce(self, trial_id: str, rung: int, milestone: float, result: dict, cutoff, others: int, action: str) -> None:
        value = result[self._metric]
        if cutoff is None:
            judged = "the first to reach it"
        else:  # ASHA compares metric_op * value, so a "min" metric's cutoff is negated back for the line
            judged = f"cutoff {self._metric_op * float(cutoff):.4f} over {others} trial{'' if others == 1 else 's'}"
        decision = "stopped" if action == TrialScheduler.STOP else "continues"
        progress.announce(
            f"trial {trial_id} at rung {rung} ({_epochs(milestone, self.n_train)}): {self._metric} {value:.4f}, {judged}: {decision}"
        )
