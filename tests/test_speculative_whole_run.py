"""--draft judged by the whole run a user waits for: loading the draft model and its reading of the prompt
count against what speculation saves, the first run measures only what it can use, and a run that
cannot gain says so in one short line."""

from __future__ import annotations

import json
from pathlib import Path

from edgeinfer.engine import generate
from edgeinfer.sampling import SamplingParams
from edgeinfer.speculative import DraftOptions, cost_model, stepper_factory
from edgeinfer.speculative.costs import CostBook, CostModel, pair_key, repays_loading
from edgeinfer.speculative.drafters import NgramDrafter
from test_speculative import models, remember_costs  # noqa: F401 (the tiny target and its drafts, a fixture)


def _measured(step: float = 0.05, load: float = 1.0) -> CostModel:
    """Costs a machine measured: passes of n tokens at step * (1 + n/4), a draft step a tenth of a target's,
    drafts rejected one time in ten, and a draft model that takes `load` seconds to load."""
    costs = CostModel()
    for n in range(1, 10):
        costs.observe_pass(n, step * (1 + n / 4))
    costs.observe_draft(step / 10)
    costs.observe_catch_up(step / 20 * 100, 100)  # reading a prompt: a twentieth of a step per token
    for _ in range(5):
        costs.observe_round(judged=10, rejected=1, tests=10, doubted=0)
    costs.observe_load(load)
    return costs


def test_a_short_answer_does_not_repay_loading_a_draft_model_but_a_long_one_does():
    costs = _measured(step=0.05, load=1.0)
    assert not repays_loading(costs, 0.1, cap=8, prompt_tokens=30, answer_tokens=8)
    assert repays_loading(costs, 0.1, cap=8, prompt_tokens=30, answer_tokens=400)
    # A long prompt costs the draft its reading: the same answer may no longer repay it.
    assert not repays_loading(_measured(step=0.05, load=0.2), 0.1, cap=8, prompt_tokens=4000, answer_tokens=60)
    # Nothing measured yet: the run loads the draft and learns.
    assert repays_loading(CostModel(), 0.1, cap=8, prompt_tokens=30, answer_tokens=8)


def test_the_typical_answer_is_the_latest_answers_median_within_max_tokens():
    costs = CostModel()
    assert costs.typical_answer(None) is None and costs.typical_answer(96) == 96
    for tokens in (40, 60, 500):
        costs.observe_answer(tokens)
    assert costs.typical_answer(None) == 60 and costs.typical_answer(30) == 30 and costs.typical_answer(96) == 60


def test_exactness_is_probed_past_256_tokens_only_for_a_run_that_may_get_there():
    costs = CostModel()
    costs.observe_exactness(9, 9, None)  # a short run: the long probe was not paid for
    assert costs.knows_exactness(9, long=False) and not costs.knows_exactness(9)
    assert costs.verify_cap(8) == 8 and costs.verify_cap(8, long=True) == 0  # nothing verified there unprobed
    costs.observe_exactness(9, 9, 4)
    costs.observe_exactness(9, 9, None)  # a later short run keeps what a long one found
    assert costs.verify_cap(8, long=True) == 3


def _remember_loading(home: Path, target: Path, drafter: str, seconds: float) -> None:
    book = CostBook(home / "speculation-costs.json")
    book.get(pair_key(target, drafter, 2, None, "q8_0")).observe_load(seconds)
    book.save()


def test_a_run_too_short_to_repay_the_draft_model_leaves_it_unloaded_and_says_so(models, edgeinfer_home, cli):
    target = models.target.path
    plain_args = ["run", "--raw", "-m", target, "--temperature", "0", "-t", "2", "--cache-type", "q8_0", "--json",
                  "-n", "6", "Once upon a time"]
    args = [*plain_args[:-1], "--draft", models.q4, "--draft-p-min", "0", "Once upon a time"]
    # Earlier runs here: cheap passes, a cheap draft, and a draft model that took 0.2 s to load.
    remember_costs(edgeinfer_home, target, models.q4.name, lambda n: 0.01 * (1 + 0.05 * n), 0.001, cache_type="q8_0")
    _remember_loading(edgeinfer_home, target, models.q4.name, 0.2)
    code, out, err = cli(*args)
    short = json.loads(out)
    assert code == 0 and short["text"] == json.loads(cli(*plain_args).stdout)["text"]
    assert f"{models.q4.name} not loaded, copies out of the context only: an answer of about 6 tokens would not" \
           " repay loading it" in err
    assert short["speculative"]["drafter"] == "ngram"  # copies out of the context still run
    # A long answer repays the same load.
    code, out, err = cli(*[a if a != "6" else "60" for a in args])
    assert code == 0 and "not loaded" not in err and json.loads(out)["speculative"]["drafter"] == models.q4.name


def test_a_first_short_run_measures_no_pass_past_256_tokens_and_times_its_probe(models):
    target, book = models.target, CostBook(None)
    prompt = target.tokenize("Once upon a time")
    short = stepper_factory(NgramDrafter, DraftOptions(ref="ngram"), max_tokens=20, book=book)
    generate(target, prompt, SamplingParams(temperature=0), max_tokens=20, stepper_factory=short)
    costs = cost_model(target, NgramDrafter(), book)
    assert costs.exact[1] == 9 and costs.exact_long is None  # the short probe only
    assert costs.passes  # its passes were timed by that probe, not by a second calibration
    target.truncate(0)
    whole = stepper_factory(NgramDrafter, DraftOptions(ref="ngram"), book=book)  # up to the context's end
    generate(target, prompt, SamplingParams(temperature=0), max_tokens=20, stepper_factory=whole)
    assert costs.exact_long is not None


def test_the_stats_line_is_short_and_verbose_gives_every_figure(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-t", "2", "-n", "128", "--draft", "ngram",
            "--stats", "The dog and the dog and the dog and the"]
    code, _, err = cli(*args)
    line = next(text for text in err.splitlines() if text.startswith("speculative"))
    assert code == 0 and "drafted tokens accepted" in line and "tokens per target pass" in line
    assert "the plain speed measured here" in line and "pass costs" not in err and len(line) < 200
    code, _, err = cli(*args, "-v")
    assert code == 0 and "pass costs {1: 1.0" in err and "exact passes up to" in err and "stops on doubt" in err


def test_a_short_first_run_does_not_pay_for_measuring_and_a_longer_one_does(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-t", "2", "--cache-type", "q8_0",
            "--json", "--draft", "ngram", "The dog and the dog and the dog and the"]
    code, out, err = cli(*args, "-n", "96")
    assert code == 0 and "speculation off: not yet measured on this machine" in err and "-n 128 or more" in err
    assert json.loads(out)["speculative"]["skipped"] and not (edgeinfer_home / "speculation-costs.json").exists()
    plain = json.loads(cli(*args[:-3], "-n", "96", "The dog and the dog and the dog and the").stdout)
    assert json.loads(out)["text"] == plain["text"]
    # Speculation off, --cache-type auto keeps plain decoding's f16: the answer is the plain run's own.
    unnamed = [a for a in args if a not in ("--cache-type", "q8_0")]
    off = json.loads(cli(*unnamed, "-n", "96").stdout)
    assert off["cache_type"] == "f16" and off["text"] == json.loads(cli(*unnamed[:-3], "-n", "96", unnamed[-1]).stdout)["text"]
    for _ in range(3):  # long enough to repay it: measures (timings taken beside a busy program are not
        code, out, err = cli(*args, "-n", "128")  # kept, and a shared machine has busy moments: again then)
        assert code == 0 and "speculation off" not in err and json.loads(out)["speculative"]["target_passes"] > 0
        book = json.loads((edgeinfer_home / "speculation-costs.json").read_text())
        if all(entry["steps"] for entry in book.values()):
            break
    code, out, err = cli(*args, "-n", "96")  # measured now: a short run speculates too
    assert code == 0 and "not yet measured" not in err and json.loads(out)["text"] == plain["text"]


def test_a_pair_with_the_same_token_strings_is_known_by_its_digest(models, tiny_family, tmp_path):
    """The pair check compares every token string only once per file: the digest, kept with the file's facts,
    tells the next run (a second for 152k tokens, each run, before)."""
    from edgeinfer.ggufinfo import inspect

    cache = tmp_path / "facts.json"
    target, close, other = (inspect(Path(p), cache) for p in (models.target.path, models.q4, tiny_family.other_vocab))
    assert target.vocab_digest == close.vocab_digest and target.vocab_digest != other.vocab_digest
    assert inspect(Path(models.q4), cache).vocab_digest == close.vocab_digest  # (remembered)
