"""The scheduling policy (pensieve_shim/scheduling.py) on its own: when a step
may prefill, which waiting prompt goes next, and which share its pass."""
from types import SimpleNamespace

from pensieve_shim import scheduling


def seq(n, arrived=0.0):
    return SimpleNamespace(todo=[1] * n, arrived=arrived)


def may(running=0, batchable=True, max_batch=8, since_decode=0.0, max_stall=1.0, decoded=False):
    return scheduling.may_prefill(running, batchable, max_batch, since_decode, max_stall, decoded)


def test_prefills_whenever_nothing_runs():
    assert may(running=0, batchable=False, since_decode=99.0)


def test_never_prefills_into_a_full_batch_or_a_model_that_cannot_batch():
    assert not may(running=8, max_batch=8)
    assert not may(running=1, batchable=False)


def test_within_the_stall_window_newcomers_go_first():
    assert may(running=3, since_decode=0.5, max_stall=1.0, decoded=False)


def test_past_the_stall_window_prefill_and_decode_take_turns():
    assert not may(running=3, since_decode=1.5, max_stall=1.0, decoded=False), "a decode step is due"
    assert may(running=3, since_decode=1.5, max_stall=1.0, decoded=True), "a decode step ran: a prefill may follow"
    assert not may(running=3, since_decode=0.0, max_stall=0.0, decoded=False), "0: strict turns"


def test_the_shortest_waiting_prompt_goes_next():
    a, b, c = seq(300, arrived=0.0), seq(20, arrived=1.0), seq(50, arrived=2.0)
    assert scheduling.pick([a, b, c], now=5.0) is b


def test_a_prompt_passed_over_too_long_goes_next_regardless():
    a, b = seq(300, arrived=0.0), seq(20, arrived=1.0)
    assert scheduling.pick([a, b], now=scheduling.STARVATION_S - 0.1) is b
    assert scheduling.pick([a, b], now=scheduling.STARVATION_S + 0.1) is a


def test_groups_take_the_shortest_that_fit_without_much_padding():
    first, similar, other, tiny = seq(100), seq(90), seq(95), seq(10)
    g = scheduling.group(first, [first, similar, other, tiny], prefill_batch=3, prefill_step=512, batchable=True)
    # tiny would pad the pass by 90 tokens: it waits; the two of similar length join.
    assert g == [first, similar, other]


def test_groups_respect_the_batch_size_and_the_chunk_size():
    first = seq(100)
    others = [seq(100) for _ in range(5)]
    assert len(scheduling.group(first, [first] + others, prefill_batch=2, prefill_step=512, batchable=True)) == 2
    long = seq(600)
    assert scheduling.group(first, [first, long], prefill_batch=4, prefill_step=512, batchable=True) == [first]


def test_no_groups_for_a_model_that_cannot_batch_or_prefill_batch_1():
    first, other = seq(100), seq(100)
    assert scheduling.group(first, [first, other], prefill_batch=4, prefill_step=512, batchable=False) == [first]
    assert scheduling.group(first, [first, other], prefill_batch=1, prefill_step=512, batchable=True) == [first]
