"""scripts/profile_scaling.py's accounting: thread roles and the timeline's allreduce cycles."""

import json

import profile_scaling as ps


def thread(name: str, start: int) -> dict:
    return {"name": name, "state": "S", "ticks": 0, "start": start, "on_cpu_ns": 0, "wait_ns": 0, "wchan": "-"}


def test_threads_get_their_roles_from_name_sleep_and_start():
    pid = 100
    first = {100: thread("python", 1), 101: thread("python", 50), 102: thread("python", 60),
             103: thread("python", 61), 104: thread("tf_Compute", 70), 105: thread("python", 80),
             106: thread("tf_data_private", 90), 107: thread("python", 95)}
    samples = {100: ["futex_do_wait"] * 3, 101: ["futex_do_wait"] * 3, 102: ["futex_do_wait", "0", "futex_do_wait"],
               103: ["do_epoll_wait"] * 3, 104: ["0", "0", "futex_do_wait"], 105: ["0"] * 3,
               106: ["futex_do_wait"] * 3, 107: ["hrtimer_nanosleep"] * 3}
    roles = ps.classify(pid, first, samples)
    assert roles == {
        100: "Python main (Keras loop, callbacks, op dispatch)",
        101: "other (python, sleeps in futex_do_wait)",
        102: "Horovod background",  # the last to start before Gloo's loop, which it creates
        103: "Gloo TCP loop",
        104: "TensorFlow tf_Compute",
        105: "spinning: Horovod timeline writer (rank 0)",
        106: "tf.data",
        107: "other (python, sleeps in hrtimer_nanosleep)",
    }


def test_timeline_cycles_are_counted_once_per_grouped_allreduce(tmp_path):
    origin = 1_000_000_000_000  # microseconds since the epoch at the timeline's start
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": origin}}]
    for t in (100_000, 300_000, 2_500_000):  # the last allreduce is after the window
        for tensor in (1, 2):  # two tensors of one grouped call: overlapping, not equal, spans
            skew = 10 * tensor
            events += [{"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": t + skew, "pid": tensor},
                       {"ph": "E", "ts": t + 2_000, "pid": tensor},
                       {"ph": "B", "name": "ALLREDUCE", "ts": t + 2_000 + skew, "pid": tensor},
                       {"ph": "B", "name": "GLOO_ALLREDUCE", "ts": t + 3_000 + skew, "pid": tensor},
                       {"ph": "E", "ts": t + 7_000 + skew, "pid": tensor},
                       {"ph": "E", "ts": t + 8_000 + skew, "pid": tensor}]
    path = tmp_path / "timeline.json"
    text = json.dumps(events)
    path.write_text(text[:-1] + ', {"ph": "B", "na')  # cut off mid-event, as a killed writer leaves it
    result = ps.timeline_profile(str(path), origin / 1e6, origin / 1e6 + 1.0)
    assert result["allreduces"] == 2 and result["allreduces_per_sec"] == 2.0
    assert result["tensors_per_allreduce"] == 2.0
    assert result["ms_per_allreduce"] == {"ALLREDUCE": 6.01, "GLOO_ALLREDUCE": 4.01, "NEGOTIATE_ALLREDUCE": 1.99}


def test_merge_joins_overlapping_intervals_only():
    assert ps.merge([(5, 6), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 6)]
