"""flashgen bench's measuring loop, with stand-in kernels (the GPU runs are benchmarks, not tests)."""

import itertools

import pytest

from flashgen.bench import Point, _measure_peers
from flashgen.timing import tflops

POINT = Point(64, False, 1024, "bf16")


def fake_peers(times: dict[str, list[float]], broken: str | None = None, fails_in_round: dict[str, int] | None = None):
    """A check that hands back timers reading ``times[peer]`` in order and logs each call."""
    calls = []

    def check(peer, m):
        if peer == broken:
            raise RuntimeError("wrong result: relative error 1\nsecond line")
        m.error = 1e-3
        rounds = itertools.count()

        def timer():
            n = next(rounds)
            calls.append(peer)
            if fails_in_round and fails_in_round.get(peer) == n:
                raise ValueError("launch failed")
            return times[peer][n]

        return timer

    return check, calls


@pytest.mark.parametrize("rounds", [1, 3])
def test_peers_take_turns_and_report_the_median_of_their_rounds(rounds):
    times = {"flashgen": [2.0, 1.0, 1.5], "cudnn": [3.0, 9.0, 2.0], "flash": [4.0, 4.5, 5.0]}
    check, calls = fake_peers(times)
    result = _measure_peers(POINT, ("flashgen", "cudnn", "flash"), check, rounds)
    # Each round starts one peer further along, so no peer is always first (after the idle checks) or last.
    assert calls == ["flashgen", "cudnn", "flash", "cudnn", "flash", "flashgen", "flash", "flashgen", "cudnn"][:3 * rounds]
    for peer, ms in times.items():
        m = result.measurements[peer]
        assert m.round_ms == ms[:rounds]
        assert m.ms == sorted(ms[:rounds])[(rounds - 1) // 2]
        assert m.tflops == pytest.approx(tflops(POINT.flops, m.ms))


def test_a_peer_that_fails_its_check_or_a_round_is_reported_and_the_others_go_on():
    times = {"flashgen": [1.0, 1.0, 1.0], "flex": [2.0, 2.0, 2.0], "cudnn": [3.0, 3.0, 3.0]}
    check, calls = fake_peers(times, broken="flash", fails_in_round={"flex": 1})
    result = _measure_peers(POINT, ("flashgen", "flash", "flex", "cudnn"), check, 3)
    assert calls == ["flashgen", "flex", "cudnn", "flex", "cudnn", "flashgen", "flashgen", "cudnn"]
    assert result.measurements["flash"].failure == "RuntimeError: wrong result: relative error 1"
    assert result.measurements["flex"].failure == "ValueError: launch failed"
    assert result.measurements["flash"].ms is None and result.measurements["flex"].ms is None
    assert result.measurements["cudnn"].ms == 3.0 and result.measurements["flashgen"].failure is None
