"""The shared reconnect backoff: doubling to a cap, jitter inside the documented bounds."""

from mcsproxy.backoff import Backoff, describe_error


def test_equal_jitter_doubles_to_the_cap_and_never_waits_less_than_half_a_step() -> None:
    backoff = Backoff(0.1, 1.0)
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for step in steps:
        delay = backoff.next()
        assert step / 2 <= delay <= step
    backoff.reset()
    assert 0.05 <= backoff.next() <= 0.1


def test_full_jitter_shares_the_sequence_and_may_wait_nothing() -> None:
    backoff = Backoff(0.1, 1.0)
    assert 0.0 <= backoff.next_full() <= 0.1
    assert 0.1 <= backoff.next() <= 0.2  # the second step, whichever draw came first
    assert 0.0 <= backoff.next_full() <= 0.4


def test_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(0.5, 30.0)
    backoff.attempt = 10_000
    assert backoff.step() == 30.0


def test_describe_error_names_the_type_and_the_message() -> None:
    assert describe_error(TimeoutError()) == "TimeoutError"
    assert describe_error(OSError("refused")) == "OSError: refused"
