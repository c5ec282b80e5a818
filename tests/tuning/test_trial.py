"""The trial adapter's own rules, without a cluster; real trials run in test_sweep, test_faults and test_board."""

import threading
import time

from kd_tune.tuning.trial import RUNNING, AbortTrainOnStop

HELD_S = 0.5


class FunctionTrainableStandIn:
    """What Tune's FunctionTrainable.reset_config needs: the trial's thread gone (Tune waits 2 s, then gives up)."""

    def reset_config(self, new_config: dict) -> bool:
        return RUNNING.released.is_set()


class Trainable(AbortTrainOnStop, FunctionTrainableStandIn):
    pass


def test_a_reused_actor_is_reset_only_once_its_train_run_has_let_go():
    # Rule: with reuse_actors, Tune resets a stopped trial's actor for the next trial; the reset aborts the Train run
    # and waits until the trial's thread has left it, however slowly, so Tune's own short wait finds it gone.
    # (A stand-in for Tune's FunctionTrainable: the real one is exercised by the sweeps of test_sweep.)
    def trial():
        with RUNNING.hold(None):  # no controller: abort() has nothing to stop, the run just takes HELD_S to end
            time.sleep(HELD_S)

    thread = threading.Thread(target=trial)
    thread.start()
    while RUNNING.released.is_set():
        time.sleep(0.01)
    started = time.monotonic()
    assert Trainable().reset_config({}) is True
    assert time.monotonic() - started > HELD_S / 2
    thread.join()
    assert RUNNING.released.is_set()
