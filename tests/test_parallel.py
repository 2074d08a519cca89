"""generator.parallel.run_ordered: input order, captured exceptions and output, on_done."""

import os
import sys
import time

import pytest

from generator.errors import InferenceError, UnknownModelType
from generator.parallel import Outcome, default_jobs, run_ordered


def slow_square(x):
    time.sleep(0.05 * (3 - x % 3))  # later items tend to finish first
    return x * x


def fail_on_odd(x):
    if x % 2:
        raise UnknownModelType(f"t{x}", ["llama"])
    return x


def pid_and_print(x):
    print(f"out {x}", flush=True)
    os.write(2, f"err {x}\n".encode())
    return os.getpid()


def raise_local(x):
    class Unpicklable(Exception):  # a class pickle cannot find by name
        pass

    raise Unpicklable(f"local {x}")


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_results_in_input_order_and_on_done_in_order(jobs):
    seen = []
    outcomes = run_ordered(slow_square, range(7), jobs=jobs, on_done=lambda i, o: seen.append(i))
    assert [o.get() for o in outcomes] == [x * x for x in range(7)]
    assert seen == list(range(7))
    assert all(o.ok for o in outcomes)


@pytest.mark.parametrize("jobs", [1, 2])
def test_exceptions_are_captured_per_item_with_type_and_attributes(jobs):
    outcomes = run_ordered(fail_on_odd, range(4), jobs=jobs)
    assert [o.ok for o in outcomes] == [True, False, True, False]
    error = outcomes[1].error
    assert type(error) is UnknownModelType and error.exit_code == 2
    assert str(error) == "unknown model type 't1'; closest known types: llama"
    assert error.model_type == "t1" and error.close == ["llama"]
    with pytest.raises(UnknownModelType, match="t3"):
        outcomes[3].get()


def test_an_exception_pickle_cannot_carry_still_comes_back():
    outcome, _ = run_ordered(raise_local, [1, 2], jobs=2)
    assert isinstance(outcome.error, RuntimeError)
    assert str(outcome.error) == "Unpicklable: local 1"


def boom(x):
    raise InferenceError("the layer stack", "no ModuleList", ["probe: nothing"])


def test_inference_error_round_trips():
    outcome, _ = run_ordered(boom, [0, 1], jobs=2)
    assert (
        str(outcome.error)
        == "cannot infer the layer stack: no ModuleList (evidence: probe: nothing)"
    )
    assert outcome.error.evidence == ("probe: nothing",)


def test_workers_are_other_processes_and_their_output_is_captured(capfd):
    outcomes = run_ordered(pid_and_print, range(4), jobs=2)
    assert os.getpid() not in {o.value for o in outcomes}
    assert capfd.readouterr() == ("", "")  # nothing leaked while the workers ran
    assert [o.stdout for o in outcomes] == [f"out {i}\n".encode() for i in range(4)]
    assert [o.stderr for o in outcomes] == [f"err {i}\n".encode() for i in range(4)]
    for o in outcomes:
        o.replay()
    out, err = capfd.readouterr()
    assert out == "".join(f"out {i}\n" for i in range(4))
    assert err == "".join(f"err {i}\n" for i in range(4))


def test_jobs_1_runs_here():
    outcomes = run_ordered(pid_and_print, range(2), jobs=1)
    assert {o.value for o in outcomes} == {os.getpid()}
    assert outcomes[0].stdout == b""


def test_on_done_raising_stops_the_map():
    def stop(i, outcome):
        if i == 1:
            raise KeyError("stop")

    with pytest.raises(KeyError):
        run_ordered(slow_square, range(6), jobs=2, on_done=stop)


def test_default_jobs_is_the_available_cores():
    assert default_jobs() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        run_ordered(slow_square, [1], jobs=0)
    assert Outcome(value=3).get() == 3
