"""The draft policy from recorded numbers, no model: given these measured costs and these rates, a round
drafts this long, verifies this copy, probes now and then, or steps plainly."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgeinfer.speculative import CostModel, Draft, DraftOptions, DraftPolicy, NgramDrafter
from edgeinfer.speculative.costs import Tally, expected_round, expected_tokens
from edgeinfer.speculative.policy import RATE_DECAY, Choice

HISTORY = list(range(20))
MODEL_STEP = 0.3  # a draft model's step against a target step, before any is timed; prompt lookup's is 0


def policy(pass_costs: dict[int, float], accepted: float, rejected: float, draft_max=8, step_cost_hint=0.0,
           catch_up: float | None = None, doubts: float = 0.0, draft_step: float | None = None,
           draft_min: int = 0) -> DraftPolicy:
    """A policy that has seen these pass costs (seconds) and these rates."""
    costs = CostModel()
    for n, seconds in pass_costs.items():
        for _ in range(3):
            costs.observe_pass(n, seconds)
    if catch_up is not None:
        costs.observe_catch_up(catch_up * 10, 10)
    if draft_step is not None:
        costs.observe_draft(draft_step)
    chosen = DraftPolicy(costs, DraftOptions(ref="x", draft_max=draft_max, draft_min=draft_min), step_cost_hint)
    chosen.rejected = Tally(RATE_DECAY, rejected, accepted + rejected)
    chosen.doubted = Tally(RATE_DECAY, doubts, 10.0)
    return chosen


def room(history: list[int]) -> int:
    """What a context of 512 tokens (and a batch of 512) leaves a draft after this history."""
    return min(512 - len(history), 511)


def choose(chosen: DraftPolicy, reject: float | None = None, limit: int | None = None) -> int:
    """The draft model's length for a round after HISTORY, as the stepper asks for it (at most `limit`)."""
    cap = chosen.limit(len(HISTORY), room(HISTORY))
    return chosen.choose(cap if limit is None else min(cap, limit), reject)


def look_first(chosen: DraftPolicy, history: list[int], copy: Draft) -> Choice:
    """A round of an adaptive stepper: the copy the context offers (cut to the round's limit) is weighed first."""
    limit = chosen.limit(len(history), room(history))
    offered = replace(copy, tokens=copy.tokens[:limit], dists=copy.dists[:limit])
    return chosen.next_round(limit, offered if chosen.weighs_copies(limit) else None, len(history))


def test_the_draft_length_follows_the_measured_costs_and_the_acceptance():
    cheap = {n: 0.05 * (1 + 0.1 * (n - 1)) for n in range(1, 10)}
    assert choose(policy(cheap, accepted=9, rejected=1)) >= 4
    # Verification of 4 tokens happens to be cheaper than of 3 or 5 (as measured on real CPUs): pick it.
    bumpy = {1: 0.05, 2: 0.09, 3: 0.13, 4: 0.07, 5: 0.2, 6: 0.25, 7: 0.3, 8: 0.35, 9: 0.4}
    assert choose(policy(bumpy, accepted=7, rejected=3)) == 3
    # Drafts mostly rejected, though a drafter that was always right would win: plain decoding,
    # with a probe now and then in case the text became predictable.
    fair = {n: 0.05 * (1 + 0.6 * (n - 1)) for n in range(1, 10)}
    chosen = policy(fair, accepted=1, rejected=9)
    choices = [choose(chosen) for _ in range(40)]
    assert choices.count(0) >= 36 and 1 <= sum(1 for k in choices if k) <= 4
    # Verification as dear as decoding every token: even perfect drafts cannot win, so no probes at all.
    dear = {n: 0.05 * n for n in range(1, 10)}
    chosen = policy(dear, accepted=9, rejected=1)
    assert [choose(chosen) for _ in range(100)] == [0] * 100
    # Nothing measured yet: the first step is plain, which measures v(1).
    assert choose(policy({}, accepted=1, rejected=1)) == 0


def test_a_round_is_priced_by_where_the_draft_stops():
    v = {1: 0.1, 2: 0.16, 3: 0.3, 4: 0.4}.__getitem__
    # A draft that never doubts: k steps, a pass of k + 1 tokens, accepted tokens plus the bonus.
    assert expected_round(3, 0.2, 0.0, 0.01, v) == pytest.approx((expected_tokens(0.8, 3), 3 * 0.01 + 0.4))
    # One that always doubts at once: a wasted step and a plain pass, one token.
    assert expected_round(3, 0.2, 1.0, 0.01, v) == pytest.approx((1.0, 0.01 + 0.1))
    # Half the time it stops before its first token: half the rounds are plain passes, not pairs.
    assert expected_round(1, 0.0, 0.5, 0.01, v) == pytest.approx((1.5, 0.01 + 0.5 * 0.1 + 0.5 * 0.16))
    # The first evaluation of a round re-syncs the draft (often a batch of 2): priced apart from the steps.
    assert expected_round(3, 0.2, 0.0, 0.01, v, sync=0.015) == pytest.approx((expected_tokens(0.8, 3), 0.015 + 0.02 + 0.4))


def test_a_draft_that_often_doubts_but_is_rarely_wrong_still_drafts_when_its_short_passes_pay():
    # Verifying one token costs 1.6 steps, more costs far more; the draft step is nearly free. The draft
    # stops unsure before half its tokens, and what it does propose is right: half the rounds are a
    # pass of 2 tokens for 2 tokens, half a plain step. Charging every round the 2-token pass would call
    # that a loss (1.5 tokens per 0.165 s against 10 a second); it is a win (1.5 per 0.135 s).
    dear = {1: 0.1, 2: 0.16, **{n: 0.1 * n for n in range(3, 10)}}
    chosen = policy(dear, accepted=10, rejected=0, doubts=5, step_cost_hint=0.05, draft_step=0.005)
    assert chosen.doubt == pytest.approx(0.5) and choose(chosen) == 1
    # The same draft doubting every token: nothing to gain.
    chosen = policy(dear, accepted=10, rejected=0, doubts=10, step_cost_hint=0.05, draft_step=0.005)
    assert choose(chosen) == 0


def test_pass_costs_are_kept_relative_to_a_step_so_a_busier_machine_does_not_distort_them():
    costs = CostModel()
    for n, seconds in {1: 0.05, 2: 0.07, 4: 0.09}.items():
        for _ in range(3):
            costs.observe_pass(n, seconds)
    for _ in range(7):  # the machine got twice as busy since: steps take twice as long
        costs.observe_pass(1, 0.1)
    assert costs.measured(2) == pytest.approx(0.14) and costs.ratios(4) == {1: 1.0, 2: 1.4, 4: 1.8}
    assert costs.pass_cost(3) == pytest.approx(0.1 * 1.6 * CostModel.OPTIMISM)  # between its measured neighbours


def test_a_draft_model_that_fell_behind_is_not_probed_when_catching_up_would_cost_more_than_a_probe_can_win():
    fair = {n: 0.05 * (1 + 0.6 * (n - 1)) for n in range(1, 10)}
    # Reading a missed token costs the draft 0.02 s, 40% of a plain step: after 8 plain steps a probe would
    # first spend more than two plain steps catching up. No probes at all.
    chosen = policy(fair, accepted=1, rejected=9, step_cost_hint=MODEL_STEP, catch_up=0.02)
    choices = []
    for _ in range(60):
        choices.append(choose(chosen))
        chosen.record_delivery("plain", 1, 0.05, draft_model_read=False)  # one token further behind
    assert choices == [0] * 60
    # A draft 20 times cheaper than that catches up cheaply: probes again now and then.
    chosen = policy(fair, accepted=1, rejected=9, step_cost_hint=MODEL_STEP, catch_up=0.001)
    choices = []
    for _ in range(60):
        choices.append(choose(chosen))
        probed = bool(choices[-1])
        chosen.record_delivery("draft" if probed else "plain", 1, 0.05, draft_model_read=probed)
    assert 1 <= sum(1 for k in choices if k) <= 4


def test_prompt_lookup_trusts_each_kind_of_match_as_far_as_it_has_proved_right():
    fair = {n: 0.05 * (1 + 0.6 * (n - 1)) for n in range(1, 10)}
    chosen = policy(fair, accepted=5, rejected=5)  # a drafter that costs nothing to ask
    chosen.copies.by_kind = {"4-gram": Tally(RATE_DECAY, 1.0, 10.0), "2-gram": Tally(RATE_DECAY, 9.0, 10.0)}
    assert choose(chosen, chosen.copies.rejection("4-gram"), limit=6) >= 2
    chosen.speculating["draft"] = False
    assert choose(chosen, chosen.copies.rejection("2-gram"), limit=6) == 0
    # A kind never seen starts from what earlier runs saw of it (here nothing: a hopeful guess, to be tried).
    assert chosen.copies.rejection("3-gram") == pytest.approx(chosen.costs.copy_prior("3-gram")) == 0.1


def test_prompt_lookup_tells_a_copy_of_the_prompt_from_a_copy_of_its_own_answer():
    prompt = [1, 2, 3, 4, 5, 6]
    lookup = NgramDrafter()
    lookup.prepare(prompt)
    # An edit: the answer repeats the prompt's "2 3", and the copy goes on as the prompt did.
    assert lookup.copy(prompt + [2, 3], 2) == Draft([4, 5], [None, None], source="2-gram from the prompt")
    # New code: the answer repeats "7 8", which it wrote itself; a different kind, with its own record.
    lookup = NgramDrafter()
    lookup.prepare(prompt)
    assert lookup.copy(prompt + [7, 8, 9, 7, 8], 2) == Draft([9, 7], [None, None], source="2-gram from the answer")


# A target whose verify batches cost 20% more per extra token, and a copy found after a 4-token match.
BESIDE_COPIES = {n: 0.05 * (1 + 0.2 * (n - 1)) for n in range(1, 10)}
SURE = Draft([5, 6, 7, 8], [None] * 4, source="4-gram")


def foresight(truth: list[int], said: int) -> Draft:
    """A copy after a 4-token match that is always what the target goes on to say."""
    return Draft(truth[said:], [None] * (len(truth) - said), source="4-gram")


def test_a_copy_passed_over_is_judged_all_the_same_and_its_kind_wins_back_its_place():
    # Early misses left 4-token matches out of the prompt with a record too poor to verify them. The
    # copies passed over are still judged against what the target then says, and they are right:
    # the record mends without a single verification, and the next copy is verified.
    truth = list(range(100))
    history = truth[:20]
    chosen = policy(BESIDE_COPIES, accepted=5, rejected=5)  # prompt lookup, whose copies are always right
    chosen.copies.by_kind = {"4-gram": Tally(RATE_DECAY, 9.0, 10.0)}
    plain_rounds = 0
    while look_first(chosen, history, foresight(truth, len(history)))[0] == 0 and plain_rounds < 10:
        history.append(truth[len(history)])  # a plain step: the target says the next token
        plain_rounds += 1
        chosen.judge_copies(history)
    assert 1 <= plain_rounds <= 3 and chosen.probes == 0
    assert chosen.copies.rejection("4-gram") < 0.9  # from 9 wrong in 10


def test_a_copy_shorter_than_draft_min_is_passed_over():
    # Where the text repeats every three tokens, the latest match is one period back and its copy is cut
    # off by the end of the history: three tokens, fewer than --draft-min 5 asks for. It is not verified;
    # the draft model, if any, has its turn.
    short = Draft([5, 6, 7], [None] * 3, source="4-gram")
    for step_cost_hint in (0.0, MODEL_STEP):  # prompt lookup alone; a draft model beside it
        chosen = policy(BESIDE_COPIES, accepted=9, rejected=1, step_cost_hint=step_cost_hint, draft_step=0.01,
                        catch_up=0.01, draft_min=5)
        chosen.copies.by_kind = {"4-gram": Tally(RATE_DECAY, 0.0, 10.0)}
        k, copy = look_first(chosen, HISTORY, short)
        assert copy is None and (k >= 5 if step_cost_hint else k == 0)


def test_a_draft_model_verifies_a_copy_out_of_the_context_where_the_copy_promises_more():
    chosen = policy(BESIDE_COPIES, accepted=8, rejected=2, step_cost_hint=MODEL_STEP, draft_step=0.015,
                    catch_up=0.005)
    chosen.copies.by_kind = {"4-gram": Tally(RATE_DECAY, 0.5, 10.0), "2-gram": Tally(RATE_DECAY, 8.0, 10.0)}
    k, copy = look_first(chosen, HISTORY, SURE)
    assert copy == SURE and k >= 2  # an edit repeating its prompt: no draft step at all
    # After a 2-token match copies were mostly wrong: the draft model has its turn, and it drafts.
    k, copy = look_first(chosen, HISTORY, replace(SURE, source="2-gram"))
    assert copy is None and k >= 1
    # No match in the context: the draft model as always.
    assert look_first(chosen, HISTORY, Draft())[1] is None


def test_a_sure_copy_is_verified_beside_a_draft_model_too_slow_to_draft():
    # A draft step costs 80% of a target step and reading a skipped token as much as a step: drafting
    # cannot win, and pricing the copy with that catch-up would pass it over, but plain tokens need the same.
    chosen = policy(BESIDE_COPIES, accepted=5, rejected=5, step_cost_hint=MODEL_STEP, draft_step=0.04,
                    catch_up=0.05)
    chosen.copies.by_kind = {"4-gram": Tally(RATE_DECAY, 0.5, 10.0)}
    k, copy = look_first(chosen, HISTORY, SURE)
    assert copy == SURE and k >= 2


def test_a_copy_is_charged_only_the_catch_up_beyond_the_re_sync_that_drafting_pays_anyway():
    # Reading a skipped token costs the draft a quarter of a target step. Charged in full, that catch-up
    # would pass over a copy promising 50 tokens a second against drafting's 31; but the draft's next
    # round re-syncs in the same batch, a cost every drafting round pays.
    chosen = policy(BESIDE_COPIES, accepted=9, rejected=1, step_cost_hint=MODEL_STEP, draft_step=0.01,
                    catch_up=0.012)
    chosen.copies.by_kind = {"4-gram": Tally(RATE_DECAY, 0.5, 10.0)}
    assert look_first(chosen, HISTORY, SURE) == (4, SURE)


def test_a_draft_model_left_behind_by_copies_waits_a_few_plain_steps_for_the_next_copy():
    chosen = policy(BESIDE_COPIES, accepted=9, rejected=1, step_cost_hint=MODEL_STEP, draft_step=0.01,
                    catch_up=0.01)
    assert look_first(chosen, HISTORY, Draft())[0] >= 2  # in step with the history: it drafts at once
    # A run of copies went by: 40 tokens for the draft to read (0.4 s, 8 plain steps). Where an edit repeats
    # its prompt the next copy is a token or two away, so it steps plainly for a while; each plain step costs
    # 0.018 s more than drafting would and leaves one more token to read: within 0.39 s, it drafts again.
    chosen.record_delivery("copy", 40, 0.5, draft_model_read=False)
    waited = 0
    while look_first(chosen, HISTORY, Draft())[0] == 0 and waited < 100:
        waited += 1
        chosen.record_delivery("plain", 1, 0.05, draft_model_read=False)
    assert 10 <= waited <= 15
    assert look_first(chosen, HISTORY, Draft())[0] >= 2


def test_a_draft_length_once_timed_as_dear_is_tried_again_now_and_then():
    """One busy moment during calibration must not keep a length out of use for good: on a pair's first
    run a pass of 3 tokens timed at 2.9 steps (2.3 is usual for Q4_K_M here) made 1-token drafts look
    best, and a length never chosen is never timed again."""
    chosen = policy({1: 0.05, 2: 0.05 * 1.63, 3: 0.05 * 2.88}, accepted=19, rejected=1, draft_max=2)
    assert choose(chosen) == 1
    chosen.rounds = 30  # rounds went by without a pass of 3
    assert choose(chosen) == 2 and chosen.explored == 1
    assert choose(chosen) == 1  # once, until another EXPLORE_GAP rounds pass
    chosen.rounds = 60
    assert choose(chosen) == 2
    # A neighbour that promises far less than the best is left alone.
    hopeless = policy({1: 0.05, 2: 0.05 * 1.63, 3: 0.05 * 5.0}, accepted=19, rejected=1, draft_max=2)
    hopeless.rounds = 30
    assert choose(hopeless) == 1 and hopeless.explored == 0


def test_copies_that_lost_on_new_code_do_not_switch_off_a_draft_model_that_wins_there():
    chosen = policy(BESIDE_COPIES, accepted=9, rejected=1, step_cost_hint=MODEL_STEP, draft_step=0.01)
    assert choose(chosen) >= 2
    for _ in range(6):  # copies that promised much, verified and mostly rejected: a quarter of plain speed
        chosen.record_delivery("copy", 2, 0.4, draft_model_read=False)
        chosen.decide({3: 100.0}, 3, "copy")
    assert not chosen.speculating["copy"] and chosen.losing("copy")
    assert choose(chosen) >= 2 and chosen.speculating["draft"]
