"""The multi-suite protocol's pure parts: suites drawn by a seed, and intervals pooled over runs."""

import json

import pytest

import benchmarks.suites as suites_cli
from benchmarks.suites import draw_suites, pooled_diff, resolve_suites, table

TASKS = tuple(f"t{i}" for i in range(20))


def test_random_suites_are_disjoint_sized_2_to_6_and_fixed_by_the_draw_seed():
    suites = draw_suites(3, 7, TASKS)
    assert len(suites) == 3 and all(2 <= len(s) <= 6 for s in suites)
    flat = [t for s in suites for t in s]
    assert len(flat) == len(set(flat))  # disjoint
    assert draw_suites(3, 7, TASKS) == suites and draw_suites(3, 8, TASKS) != suites


def test_draw_stops_when_the_pool_runs_out():
    assert sum(len(s) for s in draw_suites(50, 1, TASKS[:9])) <= 9


def test_a_drawn_suite_runs_alone_by_its_name():
    drawn = resolve_suites("random:3", "default", 29)
    assert resolve_suites("random29-2", "default", 0) == {"random29-2": drawn["random29-2"]}
    with pytest.raises(ValueError, match="has only"):
        resolve_suites("random29-40", "default", 0)


def test_unknown_suite_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown suite"):
        resolve_suites("everything", "default", 0)


def run(suite, seed, sft, dpo, rft):
    keys = [f"a:{i}" for i in range(len(sft))]
    return {"suite": suite, "seed": seed, "tasks": ["a"], "pairs": 10, "pair_yield": 0.5, "wall_seconds": {"total": 1.0},
            "eval_success": {"sft": dict(zip(keys, sft)), "dpo": dict(zip(keys, dpo)), "rft": dict(zip(keys, rft))}}


def test_pooled_difference_pairs_episodes_across_training_seeds():
    runs = [run("s", 0, [0] * 10, [1] * 10, [1] * 5 + [0] * 5), run("s", 1, [0] * 10, [1] * 5 + [0] * 5, [0] * 10)]
    d, lo, hi, n = pooled_diff(runs, "dpo", "sft")
    assert n == 20 and d == pytest.approx(75.0) and lo > 0
    d, lo, hi, n = pooled_diff(runs, "dpo", "rft")
    assert d == pytest.approx(50.0) and lo <= d <= hi
    assert pooled_diff(runs, "dpo", "eto") is None  # no run evaluated that arm
    rows, text = table({"runs": runs})
    assert rows[0]["sft"] == 0 and rows[0]["dpo"] == 75 and "pooled over all suites" in text


def test_stage_overrides_reach_every_run_and_a_bad_one_fails_before_any(tmp_path, monkeypatch):
    calls = []

    def fake_learning(argv):
        calls.append(argv)
        return {"seed": int(argv[argv.index("--seed") + 1]), **run("x", 0, [0], [1], [0])}

    monkeypatch.setattr(suites_cli.learning, "main", fake_learning)
    out = tmp_path / "suites.json"
    suites_cli.main(["--suites", "default", "--train-seeds", "0,1", "--json", str(out), "--dpo", '{"anchor_weight": 0}',
                     "--sft", '{"micro_batch_size": 1}', "--rollout-seeds", "6", "--pair-validation-seeds", "1", "--num-envs", "4",
                     "--rollouts", '{"expert_starts": true}'])
    assert len(calls) == 2 and all(c[c.index("--dpo") + 1] == '{"anchor_weight": 0}' for c in calls)
    assert all(c[c.index("--sft") + 1] == '{"micro_batch_size": 1}' for c in calls)
    assert all(c[c.index("--num-envs") + 1] == "4" for c in calls)
    assert all(c[c.index("--rollouts") + 1] == '{"expert_starts": true}' for c in calls)
    assert all(c[c.index("--rollout-seeds") + 1] == "6" and c[c.index("--pair-validation-seeds") + 1] == "1" for c in calls)
    with pytest.raises(ValueError, match="unknown dpo_adapter option.*no_such_option"):
        suites_cli.main(["--suites", "default", "--json", str(tmp_path / "bad.json"), "--dpo", '{"no_such_option": 1}'])
    with pytest.raises(ValueError, match="--sft: unknown sft_adapter option.*micro_batch"):
        suites_cli.main(["--suites", "default", "--json", str(tmp_path / "bad.json"), "--sft", '{"micro_batch": 1}'])
    with pytest.raises(ValueError, match="--rollouts: unknown rollout_trajectories option.*expert_start"):
        suites_cli.main(["--suites", "default", "--json", str(tmp_path / "bad.json"), "--rollouts", '{"expert_start": true}'])
    assert len(calls) == 2 and not (tmp_path / "bad.json").exists()


def test_the_table_pools_runs_from_several_results_files(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": [run("s1", 0, [0] * 10, [1] * 10, [1] * 10)]}))
    b.write_text(json.dumps({"runs": [run("s2", 0, [0] * 10, [0] * 10, [1] * 10)]}))
    out = suites_cli.main(["--table-only", "--json", str(a), "--pool-with", str(b)])
    assert [r["suite"] for r in out["rows"]] == ["s1", "s2"]
    assert "DPO - RFT -50.0" in out["text"] and "(n=20)" in out["text"]
    assert json.loads(a.read_text())["runs"][0]["suite"] == "s1" and len(json.loads(a.read_text())["runs"]) == 1  # read only
    with pytest.raises(SystemExit):
        suites_cli.main(["--table-only", "--json", str(a), "--pool-with", str(tmp_path / "missing.json")])
    assert "no results file" in capsys.readouterr().err
    monkeypatch.setattr(suites_cli.learning, "main", lambda argv: pytest.fail("a run started before the missing file was named"))
    with pytest.raises(SystemExit):  # a missing file fails before the first run, not after
        suites_cli.main(["--suites", "default", "--json", str(a), "--pool-with", str(tmp_path / "missing.json")])


def test_per_task_table_pools_each_task_over_the_runs_that_evaluated_it(tmp_path):
    a = run("s1", 0, [0] * 4, [1] * 4, [1] * 4)
    b = run("s2", 0, [1] * 4, [1] * 4, [0] * 4)
    b["eval_success"] = {arm: {k.replace("a:", "b:"): v for k, v in eps.items()} for arm, eps in b["eval_success"].items()}
    c = run("s3", 1, [0, 0], [0, 0], [0, 1])  # task a again, from another suite
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"runs": [a, b, c]}))
    out = suites_cli.main(["--table-only", "--per-task", "--json", str(path)])
    rows = {r["task"]: r for r in out["task_rows"]}
    assert rows["a"]["runs"] == 2 and rows["a"]["episodes"] == 6
    assert rows["a"]["dpo"] == pytest.approx(400 / 6) and rows["a"]["dpo_minus_rft"][0] == pytest.approx(-25.0)  # mean of the runs' differences (0, -50)
    assert rows["b"]["runs"] == 1 and rows["b"]["dpo_minus_rft"][0] == pytest.approx(100.0) and rows["b"]["dpo_minus_sft"][0] == 0
    assert "\nb " in out["text"]
    assert "task_rows" not in suites_cli.main(["--table-only", "--json", str(path)])
