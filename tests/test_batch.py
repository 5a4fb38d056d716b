"""Batched generation on real llama.cpp with a tiny model: sequences side by side in one context.

The model: the tiny target quantized to Q8_0, over a q8_0 KV cache. Measured as speculative.exact_batch
measures passes (docs/batching.md), that is the pair whose batched rows llama.cpp scores bit for bit as it
scores one-token steps, at 2, 4 and 8 sequences: with an f16 cache some rows of a Q8_0 model differ, and
with F32 or F16 weights every row differs in its last bits. So a sequence answered beside others can be
compared token for token with the same prompt answered alone.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edgeinfer.batch import AdmissionPolicy, Batcher, Job, generate_batch
from edgeinfer.engine import LoadOptions, generate, load
from edgeinfer.errors import UsageError
from edgeinfer.sampling import SamplingParams
from test_speculative import PROMPTS, quantize

GREEDY = SamplingParams(temperature=0)
SOLO = LoadOptions(n_ctx=256, n_threads=2, cache_type="q8_0")


@pytest.fixture(scope="module")
def q8(tiny_family, tmp_path_factory) -> Path:
    return quantize(tiny_family.target, tmp_path_factory.mktemp("batch") / "tiny-q8_0.gguf", "LLAMA_FTYPE_MOSTLY_Q8_0")


def alone(path: Path, prompts: list[list[int]], sampling: SamplingParams = GREEDY, max_tokens: int = 40,
          options: LoadOptions = SOLO) -> list[tuple[int, ...]]:
    """Each prompt's answer from a context of its own, the way `edgeinfer run` answers it."""
    with load(path, options) as model:
        return [generate(model, prompt, sampling, max_tokens=max_tokens).tokens for prompt in prompts]


def tokens_of(path: Path, texts: list[str]) -> list[list[int]]:
    with load(path, SOLO) as model:
        return [model.tokenize(text, add_special=False) for text in texts]


# --- the admission policy, numbers only ---------------------------------------------


def test_the_policy_admits_while_places_and_cells_last():
    policy = AdmissionPolicy(slots=4, cells=1000, step_tokens=64)
    assert policy.admits(live=3, held=500, prompt=100)
    assert not policy.admits(live=4, held=0, prompt=10)  # no place
    assert not policy.admits(live=1, held=950, prompt=100)  # no cells for its prompt
    assert policy.prompt_budget(generating=3) == 61 and policy.prompt_budget(generating=64) == 0
    assert policy.worth_sharing(8) and not policy.worth_sharing(7)


def test_a_context_found_full_admits_fewer_from_then_on():
    policy = AdmissionPolicy(slots=4, cells=1000)
    policy.crowded(live=3)
    assert policy.admits(live=1, held=0, prompt=10) and not policy.admits(live=2, held=0, prompt=10)
    policy.crowded(live=1)
    assert policy.admits(live=0, held=0, prompt=10)  # one at least, always


def test_a_step_must_have_room_for_every_sequences_token():
    with pytest.raises(UsageError):
        AdmissionPolicy(slots=8, cells=1000, step_tokens=4)


# --- isolation: a sequence beside others answers as it would alone -------------------------------


@pytest.mark.parametrize("parallel", [2, 4])
def test_each_sequence_answers_exactly_as_the_same_prompt_alone(q8, parallel):
    prompts = tokens_of(q8, PROMPTS)
    expected = alone(q8, prompts)
    with load(q8, replace(SOLO, n_seq=parallel)) as model:
        answers = list(generate_batch(model, [Job(i, tuple(p), GREEDY, 40) for i, p in enumerate(prompts)]))
    assert sorted(a.key for a in answers) == list(range(len(prompts)))
    for answer in answers:
        assert answer.result.tokens == expected[answer.key], PROMPTS[answer.key]
        assert answer.result.finish_reason == "length" and answer.result.completion_tokens == 40


def test_sampled_sequences_keep_their_own_random_state(q8):
    # Each sequence draws from its own generator: with the same seed, the same answer as alone, whatever
    # the others beside it drew.
    prompts = tokens_of(q8, PROMPTS[:4])
    hot = SamplingParams(temperature=1.2, seed=7)
    expected = alone(q8, prompts, hot, 30)
    with load(q8, replace(SOLO, n_seq=4)) as model:
        answers = {a.key: a.result.tokens for a in generate_batch(model, [Job(i, tuple(p), hot, 30)
                                                                           for i, p in enumerate(prompts)])}
    assert [answers[i] for i in range(4)] == expected
    assert len(set(expected)) == 4


def test_stop_strings_and_max_tokens_are_each_sequences_own(q8):
    prompts = tokens_of(q8, PROMPTS[:3])
    with load(q8, SOLO) as model:
        whole = generate(model, prompts[0], GREEDY, max_tokens=40).text
    stop = whole[12:15]
    assert stop.strip()
    jobs = [Job("stopped", tuple(prompts[0]), GREEDY, 40, (stop,)), Job("short", tuple(prompts[1]), GREEDY, 3),
            Job("long", tuple(prompts[2]), GREEDY, 25)]
    with load(q8, replace(SOLO, n_seq=3)) as model:
        answers = {a.key: a.result for a in generate_batch(model, jobs)}
    assert answers["stopped"].text == whole[: whole.index(stop)] and answers["stopped"].finish_reason == "stop"
    assert answers["short"].completion_tokens == 3 and answers["long"].completion_tokens == 25


# --- continuous batching -------------------------------------------------------------------


def test_a_finished_sequence_leaves_at_once_and_a_waiting_one_takes_its_place(q8):
    prompts = tokens_of(q8, PROMPTS[:3])
    with load(q8, replace(SOLO, n_seq=2)) as model:
        batcher = Batcher(model)
        for key, prompt, n in (("short", prompts[0], 3), ("long", prompts[1], 30), ("waiting", prompts[2], 10)):
            batcher.submit(Job(key, tuple(prompt), GREEDY, n))
        done = batcher.step()  # both prompts read, a first token each; the third waits
        assert done == [] and [s.job.key for s in batcher.live] == ["short", "long"]
        assert [s.job.key for s in batcher.waiting] == ["waiting"]
        short = batcher.live[0]
        while not done:
            done = batcher.step()
        # Its place is free at once; its cells stay there as a prefix for whoever comes next.
        assert [a.key for a in done] == ["short"] and short.slot == -1
        assert batcher.kept == {0: short.tokens[:-1]} and model.held(0) == len(short.tokens) - 1
        batcher.step()  # the next step admits the waiting one into that place and reads its prompt
        admitted = next(s for s in batcher.live if s.job.key == "waiting")
        assert admitted.slot == 0 and model.held(0) == len(prompts[2]) and batcher.kept == {}
        finished = {}
        while batcher.busy:
            finished.update((a.key, a.result) for a in batcher.step())
        assert finished["waiting"].tokens == alone(q8, [prompts[2]], max_tokens=10)[0]
        batcher.close()
        # Sequence 0's cells are what the model's record says; every other sequence's are free.
        assert model.held(1) == 0 and model.held(0) == len(model.cached) > 0


def test_the_next_turn_placed_where_its_beginning_is_kept_reads_only_its_new_tokens(q8):
    first, other = tokens_of(q8, PROMPTS[:2])
    with load(q8, replace(SOLO, n_seq=2)) as model:
        batcher = Batcher(model)
        batcher.submit(Job("turn 1", tuple(first), GREEDY, 6))
        batcher.submit(Job("other", tuple(other), GREEDY, 30))
        answers = {}
        while "turn 1" not in answers:
            answers.update((a.key, a) for a in batcher.step())
        turn2 = first + list(answers["turn 1"].result.tokens) + tokens_of(q8, [" and then"])[0][1:]
        batcher.submit(Job("turn 2", tuple(turn2), GREEDY, 10))
        while batcher.busy:
            answers.update((a.key, a) for a in batcher.step())
    kept = len(first) + 6 - 1  # (the last token sampled was never read)
    assert answers["turn 2"].prompt_read == len(turn2) - kept
    assert answers["turn 2"].result.tokens == alone(q8, [turn2], max_tokens=10)[0]


def test_a_cancelled_sequence_leaves_at_the_next_step(q8):
    prompts = tokens_of(q8, PROMPTS[:2])
    with load(q8, replace(SOLO, n_seq=2)) as model:
        batcher = Batcher(model)
        batcher.submit(Job("a", tuple(prompts[0]), GREEDY, 50))
        batcher.submit(Job("b", tuple(prompts[1]), GREEDY, 50))
        batcher.step()
        batcher.cancel("a")
        done = batcher.step()
        assert [(a.key, a.result.finish_reason, a.result.completion_tokens) for a in done] == [("a", "cancelled", 1)]
        assert [s.job.key for s in batcher.live] == ["b"]


def test_a_prompt_too_long_for_the_context_is_answered_by_its_error_and_the_others_go_on(q8):
    prompts = tokens_of(q8, PROMPTS[:2])
    with load(q8, replace(SOLO, n_ctx=64, n_seq=2)) as model:
        jobs = [Job("long", tuple(prompts[0] * 10), GREEDY, 5), Job("fine", tuple(prompts[1]), GREEDY, 5)]
        answers = {a.key: a for a in generate_batch(model, jobs)}
    assert answers["long"].result is None and "the context holds 64" in answers["long"].error
    assert answers["fine"].result.completion_tokens == 5


def test_a_context_with_too_few_cells_for_all_sequences_holds_fewer_and_still_answers_all(q8):
    # 3 sequences that grow to 120 tokens each in 256 cells: llama.cpp finds no cells for some step (its
    # llama_decode returns 1), the newest sequence gives its cells back and waits, and fewer are admitted.
    prompts = tokens_of(q8, PROMPTS[:3])
    options = replace(SOLO, n_ctx=128, n_seq=3, n_cells=256)
    with load(q8, options) as model:
        batcher = Batcher(model)
        for i, prompt in enumerate(prompts):
            batcher.submit(Job(i, tuple(prompt), GREEDY, 110 - len(prompt)))
        answers = {}
        while batcher.busy:
            answers.update((a.key, a.result) for a in batcher.step())
    assert batcher.preempted >= 1 and batcher.policy.most < 3
    assert sorted(answers) == [0, 1, 2]
    assert all(r.finish_reason == "length" and r.completion_tokens == 110 - len(p)
               for r, p in zip((answers[i] for i in range(3)), prompts))


def test_a_sequence_alone_that_fills_every_cell_ends_as_a_full_context_does(q8):
    prompt = tokens_of(q8, PROMPTS[:1])[0]
    # (llama.cpp makes a cache of a multiple of 256 cells: here 256, for sequences of up to 400 tokens)
    with load(q8, replace(SOLO, n_ctx=400, n_seq=2, n_cells=256)) as model:
        assert model.n_cells == 256
        answer, = generate_batch(model, [Job(0, tuple(prompt), GREEDY, 300)])
    assert answer.result.finish_reason == "context"
    assert answer.result.prompt_tokens + answer.result.completion_tokens == 257  # every cell, and the last sampled


# --- shared prefixes ---------------------------------------------------------------------------


def test_a_prompt_beginning_as_another_sequences_reads_only_its_own_part(q8):
    header = " ".join(PROMPTS) + "\n"  # a long shared beginning (a system prompt, a file under discussion)
    first, second = tokens_of(q8, [header + "Question one: the fox", header + "Question two: the dog"])
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 40
    with load(q8, replace(SOLO, n_seq=2)) as model:
        answers = {a.key: a for a in generate_batch(model, [Job(1, tuple(first), GREEDY, 20),
                                                            Job(2, tuple(second), GREEDY, 20)])}
    assert answers[1].prompt_read == len(first)
    assert answers[2].prompt_read == len(second) - shared  # the rest was given by the first sequence's cells
    assert [answers[1].result.tokens, answers[2].result.tokens] == alone(q8, [first, second], max_tokens=20)


def test_a_sequence_given_a_prefix_keeps_it_after_its_donor_leaves(q8):
    header = " ".join(PROMPTS) + "\n"
    first, second = tokens_of(q8, [header + "one", header + "two and more"])
    with load(q8, replace(SOLO, n_seq=2)) as model:
        answers = {a.key: a.result for a in generate_batch(model, [Job(1, tuple(first), GREEDY, 2),
                                                                   Job(2, tuple(second), GREEDY, 30)])}
    assert answers[2].tokens == alone(q8, [second], max_tokens=30)[0]


def test_a_step_may_read_more_tokens_than_one_sequences_context_holds(q8):
    # Four 40-token prompts of a 64-token context each: one step of 160 tokens reads them all.
    prompts = [p[:40] for p in tokens_of(q8, [" ".join(PROMPTS[i:] + PROMPTS[:i]) for i in range(4)])]
    with load(q8, replace(SOLO, n_ctx=64, n_seq=4)) as model:
        batcher = Batcher(model, AdmissionPolicy(slots=4, cells=model.n_cells, step_tokens=160))
        for i, prompt in enumerate(prompts):
            batcher.submit(Job(i, tuple(prompt), GREEDY, 10))
        batcher.step()
        assert [model.held(s.slot) for s in batcher.live] == [40] * 4 and batcher.steps == 1


def test_a_sequence_whose_grammar_dead_ends_fails_alone_and_the_others_are_answered(q8):
    from edgeinfer.grammar import from_grammar

    prompts = tokens_of(q8, PROMPTS[:2])
    with load(q8, replace(SOLO, n_seq=2)) as model:
        dead = from_grammar('root ::= "ab" [\\x00]\n').compile(model)  # (no token spells a NUL)
        answers = {a.key: a for a in generate_batch(model, [Job("dead", tuple(prompts[0]), GREEDY, 20, grammar=dead),
                                                            Job("fine", tuple(prompts[1]), GREEDY, 20)])}
    assert answers["dead"].result is None and "allows no token" in answers["dead"].error
    assert answers["fine"].result.tokens == alone(q8, [prompts[1]], max_tokens=20)[0]
