"""The pieces of the token loop that need no model: text streaming and sampling."""

from __future__ import annotations

import numpy as np
import pytest

from edgeinfer.errors import UsageError
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.textstream import TextStream


def test_a_character_split_across_tokens_is_never_printed_broken():
    stream = TextStream()
    emoji = "🙂".encode()
    shown = [stream.push(b"smile "), stream.push(emoji[:2]), stream.push(emoji[2:]), stream.push(b"!")]
    assert shown == ["smile ", "", "🙂", "!"]
    assert "\ufffd" not in "".join(shown)


def test_a_stop_string_split_across_pieces_is_never_printed():
    stream = TextStream(stop=["END"])
    shown = [stream.push(b"abc E"), stream.push(b"N"), stream.push(b"D tail")]
    assert "".join(shown) == "abc "
    assert stream.stopped
    assert stream.text == "abc "


def test_a_false_start_of_a_stop_string_is_released():
    stream = TextStream(stop=["END"])
    shown = [stream.push(b"EN"), stream.push(b"x"), stream.flush()]
    assert "".join(shown) == "ENx"
    assert not stream.stopped


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits, []) == 1
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert {sampler.sample(logits, []) for _ in range(20)} == {1}


def test_distribution_applies_top_p_min_p_and_temperature():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0)).distribution(logits, [])
    assert probs[2] == probs[3] == 0  # 0.5 + 0.3 reaches top-p 0.75
    assert probs[:2] == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)).distribution(logits, [])
    assert probs[3] == 0 and probs[2] > 0  # 0.05 < 0.2 * 0.5 <= 0.15
    assert probs.sum() == pytest.approx(1.0)


def test_repeat_penalty_lowers_recent_tokens():
    logits = np.array([2.0, 2.0, 2.0])
    probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0)).distribution(logits, [0])
    assert probs[0] < probs[1] == pytest.approx(probs[2])


def test_seeded_sampling_follows_the_distribution():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    counts = np.bincount([sampler.sample(logits, []) for _ in range(6000)], minlength=3) / 6000
    assert counts == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0), dict(min_p=1.5), dict(top_k=-1), dict(repeat_penalty=0)])
def test_invalid_sampling_values_are_usage_errors(bad):
    with pytest.raises(UsageError):
        SamplingParams(**bad)
