"""A shared CPU: threads chosen from the free cores and following the load, and a cost book that keeps only
what it can trust. The choices are functions of numbers, tested with numbers; one real run has a busy
program beside it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeinfer import machine, threads
from edgeinfer.render import describe_threads
from edgeinfer.speculative.costs import CostBook, CostModel, PairKey
from test_speculative import models, remember_costs  # noqa: F401 (the tiny target and its drafts, a fixture)

# --- the thread choice, from numbers ----------------------------------------------------


@pytest.mark.parametrize("usable, others, expected", [
    (2, 0.0, 2), (2, 0.3, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1),  # never fewer than one
    (8, 0.0, 8), (8, 2.9, 5), (8, 3.6, 4), (1, 0.0, 1),
])
def test_the_default_threads_are_the_usable_cores_less_those_other_programs_keep_busy(usable, others, expected):
    assert threads.choose(usable, others) == expected


def test_a_busy_program_at_load_starts_the_run_on_fewer_threads_and_its_end_gives_them_back():
    tuner = threads.start(2, others_busy=1.0)
    assert tuner.now == 1 and tuner.contended
    assert tuner.observe_load(0.95) == 1  # still there
    assert tuner.observe_load(0.05) == 2  # gone: both cores again
    assert tuner.observe_load(0.7) == 1 and tuner.changes == 2
    assert "changed 2 times" in describe_threads(tuner.summary())


def test_threads_given_by_the_user_are_obeyed_whatever_the_load():
    tuner = threads.start(2, others_busy=1.0, fixed=True)
    assert tuner.now == 2 and tuner.observe_load(1.5) == 2 and tuner.contended
    assert "--threads was kept as given" in describe_threads(tuner.summary())


def test_decodes_much_slower_than_the_fastest_say_the_run_was_slowed():
    tuner = threads.start(2, others_busy=0.0)
    for seconds in [0.010] * 8:
        tuner.observe(1, seconds)
    tuner.observe(37, 0.2)  # another size has its own scale: a prompt is not a slow step
    assert not tuner.contended and describe_threads(tuner.summary()) is None
    for seconds in [0.031, 0.029, 0.035, 0.030]:
        tuner.observe(1, seconds)
    assert tuner.contended and tuner.summary()["slowest_vs_fastest"] == pytest.approx(3.0)
    assert "steps took up to 3.0x the run's fastest" in describe_threads(tuner.summary())
    assert tuner.typical_step() == pytest.approx(0.010)


def test_another_programs_cpu_time_shows_in_two_samples_and_ours_does_not():
    before = machine.CpuSample(wall=10.0, busy=100.0, own=5.0)
    assert machine.CpuSample(wall=11.0, busy=101.9, own=5.9).others_since(before) == pytest.approx(1.0)
    assert machine.CpuSample(wall=11.0, busy=100.9, own=5.9).others_since(before) == pytest.approx(0.0, abs=1e-9)
    assert machine.CpuSample(wall=11.0, busy=100.5, own=5.9).others_since(before) == 0.0  # tick rounding
    assert machine.CpuSample(wall=10.0, busy=0.0, own=5.0).others_since(before) == 0.0  # no /proc/stat: no load
    assert 1 <= machine.usable_cores() <= machine.physical_cores()


# --- the cost book's trust rules, from numbers ----------------------------------------------

KEY = PairKey("Some CPU avx2", 2, "target.gguf:1000", "draft.gguf", None)


def measured(step: float, draft: float) -> CostModel:
    costs = CostModel()
    for n in range(1, 4):
        for _ in range(3):
            costs.observe_pass(n, step * (1 + 0.4 * (n - 1)))
    costs.observe_draft(draft)
    costs.observe_exactness(3, 9, 3)
    costs.observe_round(4, rejected=True, tests=5, doubted=False)
    return costs


def test_timings_from_a_contended_run_are_not_kept_but_what_it_learned_of_the_drafts_is(tmp_path):
    path = tmp_path / "costs.json"
    book = CostBook(path)
    book._models[KEY.text()] = measured(0.030, 0.009)  # a quiet run: a draft step 0.3 of a target step
    book.save()
    busy = CostBook(path)
    costs = busy.get(KEY)
    costs.forget_timings()
    for n in range(1, 4):  # the same pair beside a busy program: everything slower, the draft step 0.73
        for _ in range(3):
            costs.observe_pass(n, 3.0 * n)
    costs.observe_draft(2.2)
    costs.observe_round(4, rejected=False, tests=5, doubted=False)
    busy.save(trusted=False)

    again = CostBook(path).get(KEY)
    assert again.measured(1) == pytest.approx(0.030) and again.draft_step(0.0) == pytest.approx(0.009)
    assert again.rejections.trials > costs.rejections.trials / 2 and again.verify_cap(8) == 2


def test_a_contended_first_run_leaves_no_timings_so_the_next_one_measures(tmp_path):
    path = tmp_path / "costs.json"
    book = CostBook(path)
    book._models[KEY.text()] = measured(3.0, 2.2)
    book.save(trusted=False)
    again = CostBook(path).get(KEY)
    assert again.measured(1) is None and again.measured(2) is None and not again.draft_steps
    assert again.verify_cap(8) == 2  # which passes are exact does not depend on the load: kept


def test_timings_from_a_slower_moment_are_doubted_by_much_faster_steps():
    costs = measured(0.087, 0.06)  # a bad minute: 87 ms steps where the machine does 27
    assert costs.outdated_by(0.027) and not costs.outdated_by(0.070)
    costs.forget_timings()
    assert costs.measured(1) is None and costs.measured(2) is None and costs.verify_cap(8) == 2
    assert not CostModel().outdated_by(0.001)  # nothing recorded: nothing to doubt


def test_a_speculation_turned_off_by_a_bad_minute_is_measured_again_by_a_quiet_run(tiny_family, models,
                                                                                    edgeinfer_home, cli):
    # Recorded in a bad minute: a 10 s step, drafts that could never pay.
    remember_costs(edgeinfer_home, models.target.path, Path(models.q4).name, lambda n: 10.0 * n, 4.0)
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "-t", "2", "--cache-type",
            "f16", "--draft", models.q4, "--no-draft-lookup", "--stats", "Once upon a time"]
    code, _, err = cli(*args)
    assert code == 0 and "speculation off" in err  # this run still believes the record...
    code, _, err = cli(*args)
    assert code == 0 and "speculation off" not in err  # ...but its quick steps sent the next one to measure again


# --- a real run beside a busy program ---------------------------------------------------


def busy_child(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c",
                             f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"])


def test_a_run_beside_a_busy_program_finishes_and_its_timings_are_not_the_machines(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "--json", "--cache-type", "q8_0",
            "--draft", "ngram", "Once upon a time"]
    quiet = json.loads(cli(*args).stdout)
    book = edgeinfer_home / "speculation-costs.json"
    recorded = json.loads(book.read_text())
    hogs = [busy_child(60) for _ in range(machine.usable_cores())]
    try:
        time.sleep(0.3)
        code, out, err = cli(*args)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    busy = json.loads(out)
    assert code == 0 and busy["text"] == quiet["text"] and busy["completion_tokens"] == 128
    assert busy["threads"]["contended"] and busy["threads"]["others_at_load"] >= 0.5
    summary = busy["threads"]
    assert summary["start"] == threads.choose(summary["most"], summary["others_at_load"])
    assert summary["start"] < summary["most"] or summary["most"] == 1
    after = json.loads(book.read_text())
    for key, entry in after.items():  # the busy run's timings were not written over the quiet ones
        earlier = recorded.get(key, {})
        assert entry["steps"] == earlier.get("steps", []) and entry["passes"] == earlier.get("passes", {})


def test_doctor_says_how_busy_the_cpu_is_and_what_the_default_would_choose(cli, edgeinfer_home):
    hog = busy_child(30)
    try:
        time.sleep(0.3)
        code, out, _ = cli("doctor", "--json")
    finally:
        hog.kill()
        hog.wait()
    report = json.loads(out)
    assert code == 0 and report["cpu_busy"] >= 0.5 and 1 <= report["usable_cores"] <= report["physical_cores"]
    assert report["default_threads"] == threads.choose(report["usable_cores"], report["cpu_busy"])
    code, out, _ = cli("doctor")
    text = " ".join(out.split())  # (as the table wraps it)
    assert code == 0 and "CPU load other programs keep" in text and "run would start with" in text
