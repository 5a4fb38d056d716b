"""Speculative decoding on real llama.cpp with tiny models: exact, adaptive, and refused for strangers.

The pairs: the tiny target (a generated model quantized to Q8_0: on llama.cpp's CPU
kernels F32 and F16 weights score a pass of 2 tokens differently from two one-token
steps, so an F32 target could verify nothing exactly) with its own Q4_K_M
quantization as draft (agrees nearly always), with an unrelated model of the same
vocabulary (agrees almost never), and with prompt lookup (no draft model at all).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeinfer import engine, speculative
from edgeinfer.speculative.costs import CostBook, PairKey, pair_key
from edgeinfer.speculative.drafters import ModelDrafter, NgramDrafter
from edgeinfer.engine import LoadOptions, generate, load
from edgeinfer.errors import IncompatibleModelsError
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.speculative import (CostModel, DraftOptions, SpeculationPlan, SpeculativeStepper, check_pair,
                                   stepper_factory)
from tinymodel import make_tiny_model

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "Once upon a time there was a small model",
    "Hello world! Hello there, how are you today?",
    "def hello(name): return",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "for i in range(10): print(i * i)",
    "Numbers like 123, 2024, 3.14 and 42",
]


def quantize(source: Path, dest: Path, ftype_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), params) == 0
    return dest


def quantized_target(tiny_family, folder: Path) -> tuple[Path, Path]:
    """The tiny target in Q8_0, and its own Q4_K_M: a draft that agrees with it most of the time."""
    return (quantize(tiny_family.target, folder / "tiny-target-q8_0.gguf", "LLAMA_FTYPE_MOSTLY_Q8_0"),
            quantize(tiny_family.target, folder / "tiny-target-q4_k_m.gguf", "LLAMA_FTYPE_MOSTLY_Q4_K_M"))


@pytest.fixture(scope="module")
def models(tiny_family, tmp_path_factory):
    """The target loaded once, and its drafts: its own Q4_K_M (close) and an unrelated seed (far)."""
    folder = tmp_path_factory.mktemp("speculative")
    q8, q4 = quantized_target(tiny_family, folder)
    options = LoadOptions(n_ctx=512, n_threads=2)
    with load(q8, options) as target, load(q4, options) as close, load(tiny_family.unrelated, options) as far:
        yield SimpleNamespace(target=target, close=close, far=far, q4=q4, options=options, folder=folder)


def drafter_for(models, which: str):
    if which == "ngram":
        return NgramDrafter()
    model = getattr(models, which)
    return ModelDrafter(model, models.target.n_vocab, models.target.info.file_size)


def run_pair(target, drafter, prompt, sampling=GREEDY, *, draft_max=4, p_min=0.0, adaptive=False, **kwargs):
    options = DraftOptions(ref=drafter.name, draft_max=draft_max, p_min=p_min, adaptive=adaptive)
    return generate(target, prompt, sampling, stepper_factory=stepper_factory(lambda: drafter, options, kwargs.get("max_tokens")),
                    **kwargs)


# --- greedy: token for token the target's own ----------------------------------------


@pytest.mark.parametrize("which", ["close", "far", "ngram"])
def test_greedy_speculation_gives_exactly_the_targets_tokens(models, which):
    target = models.target
    drafter = drafter_for(models, which)
    for prompt_text in PROMPTS:
        prompt = target.tokenize(prompt_text, add_special=False)
        plain = generate(target, prompt, GREEDY, max_tokens=60)
        for draft_max in (1, 3, 8):
            fast = run_pair(target, drafter, prompt, draft_max=draft_max, max_tokens=60)
            assert fast.tokens == plain.tokens, (which, prompt_text, draft_max)
            assert (fast.text, fast.finish_reason) == (plain.text, plain.finish_reason)
    if which == "close":
        assert fast.stats["acceptance_rate"] > 0.5 and fast.stats["tokens_per_pass"] > 1.5
    if which == "far":
        assert fast.stats["acceptance_rate"] < 0.3


def test_a_target_verifies_no_pass_longer_than_those_it_scores_exactly_as_one_token_steps(models):
    """Where llama.cpp repacks Q4_K weights (AVX2, AVX-512), passes of 4 or more tokens go through a kernel
    that rounds differently from one-token steps (by up to 0.5 on the real Qwen2.5-1.5B Q4_K_M: enough to
    break a near-tie another way), and passes of 8 or more differ for every type here. The stepper measures
    which passes agree, bit for bit, and verifies no longer ones."""
    with load(models.q4, models.options) as target:  # as `run` loads it: repacked where llama.cpp repacks
        tokens = target.tokenize(PROMPTS[3], add_special=False)
        limit = speculative.exact_batch(target, tokens, 9)
        assert 2 <= limit < 9
        singles = np.stack([target.decode([t])[0].copy() for t in tokens[: limit + 1]])
        target.truncate(0)
        assert np.array_equal(target.decode(tokens[:limit], all_logits=True), singles[:limit])
        target.truncate(0)
        assert not np.array_equal(target.decode(tokens[: limit + 1], all_logits=True), singles)
        target.truncate(0)

        book = CostBook(None)
        for drafter in (NgramDrafter(), ModelDrafter(models.close, target.n_vocab, target.info.file_size)):
            options = DraftOptions(ref=drafter.name, draft_max=8, p_min=0.0, adaptive=False)  # always the longest
            for prompt_text in PROMPTS[:4]:
                prompt = target.tokenize(prompt_text, add_special=False)
                plain = generate(target, prompt, GREEDY, max_tokens=40)
                fast = generate(target, prompt, GREEDY, max_tokens=40,
                                stepper_factory=stepper_factory(lambda: drafter, options, 40, book))
                assert fast.tokens == plain.tokens
                assert fast.stats["exact_pass_limit"] == limit
            costs = speculative.cost_model(target, drafter, book)
            assert costs.exact == (limit, 9) and max(costs.passes) <= limit + 1
            # No longer pass was ever run but the exactness probe's one try, which found it differs.
            assert all(len(samples) == 1 for n, samples in costs.passes.items() if n > limit)


def test_past_256_tokens_of_context_only_the_passes_that_score_exactly_there_are_verified(models):
    """Over a KV cache past 256 tokens llama.cpp gives a one-token step another attention kernel than a pass
    of several tokens (on the CPU, with flash attention): a pass that agreed bit for bit in a short context
    may not there (the tiny Q8_0 target here: passes of up to 9 agree before, none after). Exactness is
    measured on both sides, and a long answer keeps to what holds where it is."""
    target = models.target
    tokens = target.tokenize(PROMPTS[3], add_special=False)
    long = speculative.exact_batch(target, tokens, 9, after=300)
    with target.scratch(512) as scratch:  # what exact_batch says of a long context holds at another one
        seq = (tokens * 400)[:300 + long]
        scratch.prefill(seq[:290])
        singles = np.stack([scratch.decode([t])[0].copy() for t in seq[290 : 290 + long]])
        scratch.truncate(290)
        assert np.array_equal(scratch.decode(seq[290 : 290 + long], all_logits=True), singles)
    prompt = (tokens * 40)[:280]
    plain = generate(target, prompt, GREEDY, max_tokens=60)
    for which in ("close", "ngram"):
        fast = run_pair(target, drafter_for(models, which), prompt, draft_max=8, max_tokens=60)
        assert fast.tokens == plain.tokens
        assert fast.stats["exact_pass_limit_long"] == long


def test_a_run_that_could_verify_nothing_past_256_tokens_says_why_and_what_helps(models, edgeinfer_home, cli):
    # The tiny Q8_0 target over an f16 cache: passes of up to 9 tokens exact before 256, none after.
    prompt = " ".join(["the dog and the cat sat on the mat"] * 40)
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "-t", "2", "--cache-type", "f16", prompt]
    plain = cli(*args)
    code, out, err = cli(*args, "--draft", "ngram")
    assert code == 0 and out == plain.stdout
    assert "past 256 tokens of context no pass of 2 tokens or more" in err and "--cache-type q8_0" in err
    code, out, err = cli(*args, "--draft", "ngram", "--cache-type", "q8_0")
    assert code == 0 and "past 256" not in err
    # A chat says it once, not after every answer.
    chat = cli("chat", "-m", models.target.path, "--temperature", "0", "-n", "20", "-t", "2", "--cache-type", "f16", "--draft", "ngram",
               input=" ".join(["the dog and the cat sat on the mat"] * 26) + "\nand the dog\n")
    assert chat.exit_code == 0 and chat.stderr.count("past 256 tokens of context") == 1


def test_a_q8_0_kv_cache_keeps_passes_exact_past_256_tokens_of_context(models):
    # llama.cpp gives one-token steps over a long f16 cache a kernel of their own; over a q8_0 cache, steps
    # and passes share one: what is exact in a short context stays exact in a long one.
    options = replace(models.options, cache_type="q8_0")
    with load(models.target.path, options) as target:
        tokens = target.tokenize(PROMPTS[3], add_special=False)
        assert speculative.exact_batch(target, tokens, 9, after=300) == speculative.exact_batch(target, tokens, 9) > 1
        prompt = (tokens * 40)[:280]
        plain = generate(target, prompt, GREEDY, max_tokens=60)
        fast = run_pair(target, drafter_for(models, "close"), prompt, draft_max=8, max_tokens=60)
        assert fast.tokens == plain.tokens and fast.stats["accepted"] > 0


def test_the_adaptive_length_keeps_the_output_exact(models):
    target = models.target
    for which in ("close", "far", "ngram"):
        drafter = drafter_for(models, which)
        for prompt_text in PROMPTS[:3]:
            prompt = target.tokenize(prompt_text, add_special=False)
            plain = generate(target, prompt, GREEDY, max_tokens=50)
            fast = run_pair(target, drafter, prompt, adaptive=True, draft_max=8, max_tokens=50)
            assert fast.tokens == plain.tokens
            assert {"acceptance_rate", "tokens_per_pass", "draft_length", "tokens_per_second"} <= fast.stats.keys()


def test_end_of_generation_and_stop_strings_inside_an_accepted_block(tiny_family, models):
    # special_logit 7 makes <|im_end|> win after a few tokens on some prompts.
    stopper = make_tiny_model(models.folder / "tiny-stopper.gguf", special_logit=7.0)
    stopper_q8 = quantize(stopper, models.folder / "tiny-stopper-q8_0.gguf", "LLAMA_FTYPE_MOSTLY_Q8_0")
    stopper_q4 = quantize(stopper, models.folder / "tiny-stopper-q4_k_m.gguf", "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    ended = 0
    with load(stopper_q8, models.options) as target, load(stopper_q4, models.options) as draft:
        drafter = ModelDrafter(draft, target.n_vocab, target.info.file_size)
        for prompt_text in PROMPTS:
            prompt = target.tokenize(prompt_text, add_special=False)
            plain = generate(target, prompt, GREEDY, max_tokens=40)
            fast = run_pair(target, drafter, prompt, draft_max=8, max_tokens=40)
            assert (fast.tokens, fast.finish_reason) == (plain.tokens, plain.finish_reason)
            ended += plain.finish_reason == "stop" and len(plain.tokens) >= 2
        assert ended >= 2
    # A stop string that ends in the middle of what a round accepts: the text stops where the target's would.
    target = models.target
    for prompt_text in PROMPTS[:4]:
        prompt = target.tokenize(prompt_text, add_special=False)
        plain = generate(target, prompt, GREEDY, max_tokens=40)
        stop = plain.text[17:21]
        want = generate(target, prompt, GREEDY, max_tokens=40, stop=[stop])
        for which in ("close", "ngram"):
            got = run_pair(target, drafter_for(models, which), prompt, draft_max=8, max_tokens=40, stop=[stop])
            assert (got.text, got.finish_reason) == (want.text, "stop")


def test_max_tokens_and_a_full_context_end_as_in_plain_decoding(tiny_family, models):
    target = models.target
    prompt = target.tokenize(PROMPTS[0], add_special=False)
    for max_tokens in (1, 2, 5, 9):
        plain = generate(target, prompt, GREEDY, max_tokens=max_tokens)
        fast = run_pair(target, drafter_for(models, "close"), prompt, draft_max=8, max_tokens=max_tokens)
        assert fast.tokens == plain.tokens and fast.finish_reason == "length"
    small = LoadOptions(n_ctx=48, n_threads=2)
    with load(models.target.path, small) as target, load(models.q4, small) as draft:
        prompt = target.tokenize(PROMPTS[3], add_special=False)
        plain = generate(target, prompt, GREEDY)
        fast = run_pair(target, ModelDrafter(draft, target.n_vocab, 1), prompt, draft_max=8)
        assert plain.finish_reason == fast.finish_reason == "context"
        assert fast.tokens == plain.tokens


def test_the_next_turn_reuses_both_caches(models):
    target, draft = models.target, models.close
    drafter = drafter_for(models, "close")
    first = target.tokenize(PROMPTS[0], add_special=False)
    answer = run_pair(target, drafter, first, draft_max=4, max_tokens=20)
    second = first + list(answer.tokens) + target.tokenize(" And then", add_special=False)
    kept = len(draft.cached)
    assert kept > len(first)
    evaluated = []
    original = draft.decode
    draft.decode = lambda tokens, **kw: evaluated.append(len(tokens)) or original(tokens, **kw)
    try:
        fast = run_pair(target, drafter, second, draft_max=4, max_tokens=20)
    finally:
        del draft.decode
    assert evaluated[0] < len(second) - len(first)  # only the new turn's tokens, not the whole prompt again
    assert fast.tokens == generate(target, second, GREEDY, max_tokens=20).tokens


# --- sampling: the target's distribution, exactly ----------------------------------


def chi_square_threshold(df: int, z: float = 3.09) -> float:
    """The chi-square critical value at the 0.1% level (z = 3.09), by Wilson and Hilferty's cube-root
    approximation, which is within a percent of the exact value for df >= 3. A correct sampler fails a
    given seed with probability 0.001; a wrong one (drafts accepted unchecked, no residual) lands far above."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray, n: int) -> tuple[float, int]:
    """Pearson's statistic, with every token expected fewer than 5 times pooled into one bin."""
    expected = probs * n
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expect = np.append(expected[big], expected[~big].sum())
    keep = expect > 0
    stat = float((((observed - expect) ** 2)[keep] / expect[keep]).sum())
    if (observed[~keep] > 0).any():
        stat = math.inf  # a token the target never gives
    return stat, int(keep.sum()) - 1


@pytest.mark.parametrize("which, params", [
    ("far", SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)),
    ("close", SamplingParams(temperature=0.7, top_k=8, top_p=1.0, min_p=0.0, seed=12)),
    ("far", SamplingParams(temperature=1.5, top_k=0, top_p=0.8, min_p=0.0, seed=13)),
    ("ngram", SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, seed=14)),
])
def test_speculative_sampling_follows_the_targets_distribution(models, which, params):
    target, n = models.target, 1500
    history = target.tokenize("A cat saw the dog, and the dog", add_special=False)  # ngram finds " the dog,"
    sampler = Sampler(params)
    target.prefill(history[:-1])
    p = sampler.distribution(target.decode(history[-1:])[0].copy(), history)
    drafter = drafter_for(models, which)
    stepper = SpeculativeStepper(target, sampler, drafter, DraftOptions(ref=which, draft_max=3, p_min=0.0, adaptive=False),
                                 CostModel())
    counts = np.zeros(target.n_vocab)
    for _ in range(n):
        target.truncate(len(history) - 1)
        counts[stepper.advance(list(history))[0]] += 1
    stat, df = chi_square(counts, p, n)
    assert stat < chi_square_threshold(df), (stat, df)
    assert stepper.stats()["drafted"] > 0  # the drafts really were verified, not skipped
    if which == "far":  # the test has power here: the draft's own distribution is far outside it
        q = sampler.distribution(models.far.prefill(history), history)
        assert chi_square(counts, q, n)[0] > 10 * chi_square_threshold(df)


def test_the_chi_square_test_tells_a_wrong_distribution_apart():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(30))
    q = rng.dirichlet(np.ones(30))
    right = np.bincount(rng.choice(30, 1500, p=p), minlength=30)
    wrong = np.bincount(rng.choice(30, 1500, p=0.7 * p + 0.3 * q), minlength=30)
    assert chi_square(right, p, 1500)[0] < chi_square_threshold(chi_square(right, p, 1500)[1])
    assert chi_square(wrong, p, 1500)[0] > chi_square_threshold(chi_square(wrong, p, 1500)[1])


# --- copies beside a draft model, and the cost book ---------------------------------


def test_copies_beside_a_draft_model_keep_the_targets_tokens_and_are_remembered_by_kind(models):
    target, close = models.target, models.close
    book = CostBook(None)
    # Costs that make a copy worth verifying: passes nearly free, the draft's step dear.
    costs = book.get(pair_key(target.path, close.path.name, target.n_threads, target.n_gpu_layers))
    for n in range(1, 10):
        for _ in range(3):
            costs.observe_pass(n, 0.01 * (1 + 0.05 * n))
    costs.observe_draft(0.009)
    options = DraftOptions(ref="close", draft_max=6, p_min=0.0)
    drafter = ModelDrafter(close, target.n_vocab, target.info.file_size)
    copies = 0
    for prompt_text in PROMPTS:
        prompt = target.tokenize(prompt_text, add_special=False)
        plain = generate(target, prompt, GREEDY, max_tokens=60)
        fast = generate(target, prompt, GREEDY, max_tokens=60, stepper_factory=stepper_factory(lambda: drafter, options, 60, book))
        assert fast.tokens == plain.tokens, prompt_text
        assert fast.stats["copied"] <= fast.stats["accepted"]
        copies += fast.stats["copies"]
    assert copies > 0 and costs.sources  # copies were verified, and what each kind proved is kept
    # Without lookup the draft model drafts alone.
    drafter = ModelDrafter(close, target.n_vocab, target.info.file_size, lookup=False)
    prompt = target.tokenize(PROMPTS[3], add_special=False)
    fast = generate(target, prompt, GREEDY, max_tokens=60, stepper_factory=stepper_factory(lambda: drafter, options, 60, book))
    assert fast.stats["copies"] == 0 and fast.tokens == generate(target, prompt, GREEDY, max_tokens=60).tokens


def test_a_draft_model_whose_reading_of_the_prompt_the_answer_cannot_repay_is_set_aside_for_copies(models):
    """A server's request may bring a long new prompt for a short answer: reading it into the draft model would
    cost more than drafting saves. Then copies out of the context stand in, for that answer alone."""
    target, close = models.target, models.close
    options = DraftOptions(ref="close", draft_max=4, p_min=0.0)
    prompt = target.tokenize(" ".join(PROMPTS), add_special=False)  # (a long prompt the draft has not read)

    def speculate(max_tokens: int):
        book = CostBook(None)  # (costs as measured earlier, the same for both answers)
        costs = book.get(pair_key(target.path, close.path.name, target.n_threads, target.n_gpu_layers))
        for n in range(1, 10):
            for _ in range(3):
                costs.observe_pass(n, 0.01 * (1 + 0.1 * n))
        costs.observe_draft(0.002)
        costs.observe_catch_up(0.0025 * 40, 40)  # (the draft reads a token in a quarter of a target step)
        close.forget(-1)
        drafter = ModelDrafter(close, target.n_vocab, target.info.file_size)
        return generate(target, prompt, GREEDY, max_tokens=max_tokens,
                        stepper_factory=stepper_factory(lambda: drafter, options, max_tokens, book))

    short = speculate(6)
    assert short.tokens == generate(target, prompt, GREEDY, max_tokens=6).tokens
    assert short.stats["drafter"] == "ngram" and "set aside for this answer" in short.stats["note"]
    assert close.cached == []  # (it never read the prompt)
    long = speculate(60)  # (an answer ten times longer repays the reading)
    assert long.stats["drafter"] == close.path.name and "note" not in long.stats
    assert long.tokens == generate(target, prompt, GREEDY, max_tokens=60).tokens


def test_what_one_run_measured_is_where_the_next_run_starts(tmp_path):
    book_file = tmp_path / "speculation-costs.json"
    key = PairKey("Some CPU avx2", 2, "target.gguf:1000", "draft.gguf", None)
    book = CostBook(book_file)
    costs = book.get(key)
    for n, seconds in {1: 0.05, 2: 0.07, 3: 0.09}.items():
        costs.observe_pass(n, seconds)
    costs.observe_draft(0.01)
    costs.observe_exactness(3, 9, 1)  # passes of up to 3 tokens scored as one-token steps (4 did not); past 256, none
    for _ in range(10):  # 4 tokens proposed, one rejected, the draft's doubt stopped a fifth
        costs.observe_round(4, rejected=True, tests=5, doubted=True)
    book.save()
    assert CostBook(book_file).get(key).copy_prior("4-gram", default=0.5) == 0.5  # no copy verified yet
    for _ in range(10):  # copies after a 4-token match: 9 tokens judged, one rejected
        costs.observe_copy("4-gram", 9, rejected=True)
    book.save()

    again = CostBook(book_file).get(key)
    assert again.ratios(3) == {1: 1.0, 2: 1.4, 3: 1.8} and again.draft_step(0.0) == pytest.approx(0.01)
    assert again.rejection_prior() == pytest.approx(0.25) and again.doubt_prior() == pytest.approx(0.2)
    assert again.copy_prior("4-gram", default=0.5) == pytest.approx(1 / 9)
    assert again.knows_exactness(17) and again.verify_cap(8) == 2  # a size that failed bounds every longer one
    assert again.verify_cap(8, long=True) == 0
    again.observe_exactness(9, 9, 9)
    assert again.knows_exactness(9) and not again.knows_exactness(17)  # all agreed: --draft-max 16 must look further
    assert CostBook(book_file).peek(PairKey("Another CPU", 2, "target.gguf:1000", "draft.gguf", None)) is None
    # Which passes are exact, and what they cost, belongs to the target: another drafter starts knowing it, and
    # nothing of the draft's (its step, how often it was right).
    other = CostBook(book_file).peek(PairKey("Some CPU avx2", 2, "target.gguf:1000", "ngram", None))
    assert other.verify_cap(8) == 2 and other.ratios(3) == {1: 1.0, 2: 1.4, 3: 1.8}
    assert not other.draft_steps and other.rejection_prior() == pytest.approx(0.1)
    assert other.copy_prior("4-gram", default=0.5) == pytest.approx(1 / 9)  # copies' record: the text's, not the drafter's
    assert CostBook(book_file).peek(PairKey("Some CPU avx2", 1, "target.gguf:1000", "ngram", None)) is None
    book_file.write_text("{ not json")
    assert CostBook(book_file).get(key).measured(1) is None  # a damaged file costs some learning, nothing else


def test_a_pair_that_cannot_win_here_is_not_loaded_and_the_stats_say_why(tiny_family, models, edgeinfer_home, cli):
    # What earlier runs measured on this machine: verifying 2 tokens costs twice one, drafting a token 40%
    # (a step of 50 us: faster than the tiny target's real steps, so this run finds no reason to doubt it).
    remember_costs(edgeinfer_home, models.target.path, Path(models.q4).name, lambda n: 0.00005 * n, 0.00002)

    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "-t", "2", "--cache-type", "f16", "Once upon a time"]
    plain = cli(*args)
    code, out, err = cli(*args, "--draft", models.q4, "--stats", "--no-draft-lookup")
    assert code == 0 and out == plain.stdout
    assert "speculation off" in err and "slower than plain decoding" in err
    # Prompt lookup has no such record here: the draft model is set aside, and copies out of the context remain.
    code, out, err = cli(*args, "--draft", models.q4, "--stats")
    assert code == 0 and out == plain.stdout
    assert f"{models.q4.name} not loaded" in err and "copies out of the context only" in err
    assert "tokens per target pass" in err
    code, out, err = cli(*args, "--draft", "ngram", "--stats")
    assert code == 0 and out == plain.stdout and "tokens per target pass" in err
    # Where prompt lookup cannot win either, nothing speculates.
    remember_costs(edgeinfer_home, models.target.path, "ngram", lambda n: 0.00005 * n, 0.0)
    code, out, err = cli(*args, "--draft", models.q4, "--stats")
    assert code == 0 and out == plain.stdout and "speculation off" in err


def test_a_draft_min_beyond_the_exact_passes_turns_speculation_off_and_says_why(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "-t", "2", "--cache-type", "f16", "Once upon a time"]
    plain = cli(*args)
    # The first runs measure which passes score exactly (no pass of 64 tokens does here), the next one knows.
    for _ in range(3):
        code, out, err = cli(*args, "--draft", "ngram", "--draft-max", "64", "--draft-min", "64", "--stats")
        assert code == 0 and out == plain.stdout
    assert "speculation off: --draft-min 64 asks for more tokens than the" in err


# --- pairing -------------------------------------------------------------------------


def test_a_draft_with_another_vocabulary_is_refused_before_any_weights_load(tiny_family, edgeinfer_home, monkeypatch):
    from edgeinfer.api import RunRequest, run

    with pytest.raises(IncompatibleModelsError, match="tiny-other-vocab.gguf cannot pair with tiny-target.gguf"):
        check_pair(tiny_family.target, tiny_family.other_vocab)
    check_pair(tiny_family.target, tiny_family.unrelated)  # same vocabulary, other weights: fine

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the pair was checked")

    monkeypatch.setattr(engine, "Model", no_weights)
    request = RunRequest(prompt="hi", model=str(tiny_family.target), draft=DraftOptions(ref=str(tiny_family.other_vocab)))
    with pytest.raises(IncompatibleModelsError, match="token"):
        run(request)


def test_a_target_that_scores_no_pass_exactly_verifies_nothing_and_says_so(tiny_family, edgeinfer_home, cli):
    """On llama.cpp's CPU kernels an F32 model scores a pass of 2 tokens differently from two one-token
    steps: the first --draft run finds that out and verifies nothing; later runs do not even try."""
    args = ["run", "--raw", "-m", tiny_family.target, "--temperature", "0", "-n", "128", "-t", "2", "--cache-type", "q8_0",
            "--draft", "ngram", "--stats", "The dog and the dog and the dog and the"]
    plain = cli(*args[:-4], args[-1])
    for _ in range(2):
        code, out, err = cli(*args)
        assert code == 0 and out == plain.stdout
        assert "scores a pass of 2 tokens differently" in err
    assert "speculation off" in err and "0/0 drafted" not in err  # the second run: plain from the start
    # What it found is the target's: another drafter is not even loaded.
    code, out, err = cli(*args[:-3], str(tiny_family.unrelated), *args[-2:])
    assert code == 0 and out == plain.stdout
    assert "speculation off" in err and "scores a pass of 2 tokens differently" in err and "0/0 drafted" not in err


def remember_costs(home: Path, target: Path, drafter: str, pass_cost, draft_step: float,
                   cache_type: str = "f16") -> None:
    """Put in the home's cost book what earlier runs would have measured on some machine (2 threads)."""
    book = CostBook(home / "speculation-costs.json")
    costs = book.get(pair_key(Path(target), drafter, 2, None, cache_type))
    costs.forget_timings()  # (these figures alone, not mixed with what a test's earlier runs measured)
    for n in range(1, 10):
        for _ in range(3):
            costs.observe_pass(n, pass_cost(n))
    costs.observe_draft(draft_step)
    book.save()


def test_run_with_a_draft_prints_the_targets_answer_and_the_speculation_stats(tiny_family, models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "-t", "2", "--cache-type", "f16", "--json",
            "Once upon a time"]
    plain = json.loads(cli(*args).stdout)
    # A fresh home: the first --draft run calibrates, and on models this tiny a draft step costs about as much
    # as a target step, so whether the draft drafts at all is the cost model's call. The answer must be the
    # target's either way, and what the run measured is kept for the next one.
    code, out, err = cli(*args, "--draft", models.q4, "--draft-max", "5", "--draft-p-min", "0")
    fast = json.loads(out)
    assert code == 0 and fast["text"] == plain["text"]
    assert fast["speculative"]["drafter"] == models.q4.name and fast["speculative"]["target_passes"] > 0
    assert (edgeinfer_home / "speculation-costs.json").is_file()

    # On a machine where earlier runs found verification nearly free and the draft cheap, it drafts, and
    # nearly everything its own quantization proposes is accepted.
    (edgeinfer_home / "speculation-costs.json").unlink()
    remember_costs(edgeinfer_home, models.target.path, models.q4.name, lambda n: 0.01 * (1 + 0.05 * n), 0.001)
    code, out, err = cli(*args, "--draft", models.q4, "--draft-max", "5", "--draft-p-min", "0")
    fast = json.loads(out)
    assert code == 0 and fast["text"] == plain["text"]
    assert fast["speculative"]["accepted"] > 0 and fast["speculative"]["tokens_per_pass"] > 1
    # (the same record again: the run above timed how long loading the draft took, which 30 tokens of a model
    # this tiny cannot repay, so the next run would leave it unloaded; test_speculative_whole_run)
    remember_costs(edgeinfer_home, models.target.path, models.q4.name, lambda n: 0.01 * (1 + 0.05 * n), 0.001)
    code, out, err = cli(*args, "--draft", models.q4, "--draft-max", "5", "--draft-p-min", "0", "--no-draft-lookup")
    assert code == 0 and json.loads(out)["text"] == plain["text"] and json.loads(out)["speculative"]["copies"] == 0
    code, out, err = cli(*args[:-2], "--draft", "ngram", "--stats", "The dog and the dog and the dog and the")
    assert code == 0 and "speculative (ngram, f16 cache)" in err and "tokens per target pass" in err


def test_run_refuses_an_incompatible_draft_in_one_line(tiny_family, models, edgeinfer_home, cli):
    result = cli("run", "--raw", "-m", models.target.path, "--draft", tiny_family.other_vocab, "-n", "5", "hi")
    assert result.exit_code == 8
    assert "cannot pair" in result.error_line
