"""attnhub.timing: the clocks that `attnhub bench` and `attnhub tune` read."""

import time

from attnhub.timing import device_time_ms, host_time_us


def test_device_time_measures_the_call():
    ms = device_time_ms(lambda: time.sleep(0.002), "cpu", warmup_ms=4, rep_ms=12)
    assert 2.0 <= ms < 50.0


def test_host_time_is_per_call_in_microseconds():
    us = host_time_us(lambda: time.sleep(0.001), "cpu", calls=3, rounds=2)
    assert 1000.0 <= us < 50_000.0
