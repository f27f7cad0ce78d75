"""The learning benchmark runs end to end on the tiny preset and writes the documented JSON keys."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_learning_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "models"))
    from benchmarks.learning import main

    with pytest.raises(SystemExit, match="own DPO loss"):  # the run's DPO again under another name: refused before anything runs
        main(["--preset", "tiny", "--arms", "rft,ipo", "--dpo", '{"loss_type": ["ipo"]}', "--workdir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "learning.json"
    res = main(["--preset", "tiny", "--eval-seeds", "2", "--arms", "rft,ipo,kto,fallback,backplay", "--json", str(out), "--workdir", str(tmp_path / "work"),
                "--rollout-seeds", "5", "--pair-validation-seeds", "2",  # the suite's 4 and 1, overridden
                "--num-envs", "2"])  # evaluation on two browsers in lockstep
    saved = json.loads(out.read_text())
    assert saved["tasks"].keys() == {"click-tab", "enter-text"}
    for row in saved["tasks"].values():
        assert {"sft", "dpo", "rft", "random", "n"} <= row.keys() and row["n"] == 2
    for key in ("mean_sft", "mean_dpo", "mean_rft", "mean_random", "dpo_minus_sft_points", "diff_ci_low_points",
                "diff_ci_high_points", "dpo_minus_rft_points", "dpo_minus_rft_ci_low_points", "pairs", "pairs_sha256"):
        assert key in saved, key
    assert saved["diff_ci_low_points"] <= saved["dpo_minus_sft_points"] <= saved["diff_ci_high_points"]
    assert {"demos", "sft", "dpo_r1", "rft_r1", "eval:sft", "eval:rft_r1", "total", "loop"} <= saved["wall_seconds"].keys()
    assert saved["seeds"]["eval"][0] >= 2_000_000  # evaluation band
    assert saved["eval_num_envs"] == 2
    assert saved["seeds"]["rollout"][1] - saved["seeds"]["rollout"][0] == 4 and saved["seeds"]["pair_validation"][1] - saved["seeds"]["pair_validation"][0] == 1
    assert res["pairs"] == saved["pairs"] > 0
    r1 = saved["rounds"][0]  # success after each round, per task
    assert r1["tasks"].keys() == saved["tasks"].keys()
    assert sum(r1["tasks"].values()) / len(r1["tasks"]) == pytest.approx(r1["mean_success"], abs=1e-3)
    # and against the RFT control of the same round, with its paired interval
    assert r1["rft_tasks"].keys() == saved["tasks"].keys()
    assert r1["dpo_minus_rft_ci_points"][0] <= r1["dpo_minus_rft_points"] <= r1["dpo_minus_rft_ci_points"][1]
    assert r1["dpo_minus_rft_points"] == pytest.approx(100 * (r1["mean_success"] - r1["rft_mean_success"]), abs=0.1)
    ipo = saved["arms"]["ipo"]  # an extra preference objective on the same pairs
    assert ipo["tasks"].keys() == saved["tasks"].keys() and 0.0 <= ipo["mean"] <= 1.0
    assert ipo["ci_points"][0] <= ipo["minus_sft_points"] <= ipo["ci_points"][1]
    for other, mean in (("dpo", r1["mean_success"]), ("rft", r1["rft_mean_success"])):  # and against DPO and RFT, paired
        assert ipo[f"minus_{other}_ci_points"][0] <= ipo[f"minus_{other}_points"] <= ipo[f"minus_{other}_ci_points"][1]
        assert ipo[f"minus_{other}_points"] == pytest.approx(100 * (ipo["mean"] - mean), abs=0.1)
    assert {"arm:ipo", "arm:kto"} <= saved["wall_seconds"].keys()
    assert saved["arms"]["kto"]["tasks"].keys() == saved["tasks"].keys()  # KTO on the unpaired steps of the same rollouts
    fb = saved["fallback"]  # the run's pairs plus the expert's at the seeds no rollout solved
    assert fb["unsolved_seeds"] > 0 and fb["expert_pairs"] > 0 and fb["pairs"] == saved["pairs"] + fb["expert_pairs"]
    assert fb["ci_points"][0] <= fb["dpo_minus_fallback_points"] <= fb["ci_points"][1]
    assert saved["eval_success"]["fallback"].keys() == saved["eval_success"]["dpo"].keys()
    bp = saved["backplay"]  # the run's pairs plus those of the SFT policy's episodes from the expert's states there
    assert bp["episodes"] > 0 and bp["seeds"] <= fb["unsolved_seeds"] and bp["pairs"] == saved["pairs"] + bp["expert_start_pairs"]
    assert bp["ci_points"][0] <= bp["dpo_minus_backplay_points"] <= bp["ci_points"][1]
    assert {"rollouts:backplay", "arm:backplay"} <= saved["wall_seconds"].keys()

    # The checkpoint probe on that run: DPO from the RFT adapter, the run's SFT on the same items.
    from benchmarks.dpo_checkpoints import main as probe

    work = tmp_path / "work"
    sft = sorted(work.glob("sft_r*"))[-1]  # the last SFT round
    with pytest.raises(SystemExit, match="NAME=DIR"):  # before any training
        probe(["--preset", "tiny", "--workdir", str(work), "--sft-adapter", str(work / "rft_r1"), "--also", f"sft={tmp_path}"])
    with pytest.raises(SystemExit, match="start adapter"):  # two policies may not share a name in the table
        probe(["--preset", "tiny", "--workdir", str(work), "--sft-adapter", str(work / "rft_r1"), "--start-name", "rft",
               "--also", f"rft={sft}"])
    got = probe(["--preset", "tiny", "--workdir", str(work), "--sft-adapter", str(work / "rft_r1"), "--start-name", "rft",
                 "--also", f"sft={sft}", "--steps", "1", "--items", "1", "--json", str(tmp_path / "probe.json")])
    assert got["tasks"] == ["click-tab", "enter-text"]  # the rollouts' suite
    assert list(got["policies"]) == ["rft", "sft", "dpo@1"] and "minus_start_points" not in got["policies"]["rft"]
    for name in ("sft", "dpo@1"):
        d, lo, hi = got["policies"][name]["minus_start_points"]
        assert lo <= d <= hi
    assert json.loads((tmp_path / "probe.json").read_text())["start"] == {"name": "rft", "adapter": str(work / "rft_r1")}

    # Retention-style evaluation of that run's adapters on a task outside the suite, paired with SFT.
    from benchmarks.eval_adapter import main as evaluate

    with pytest.raises(SystemExit, match="not supported"):
        evaluate([f"sft={sft}", "--tasks", "no-such-task", "--model", "tiny-random"])
    with pytest.raises(SystemExit, match="no task left"):
        evaluate([f"sft={sft}", "--tasks", "click-tab", "--exclude", "click-tab", "--model", "tiny-random"])
    with pytest.raises(SystemExit, match="NAME=DIR"):
        evaluate([f"sft={tmp_path}", "--model", "tiny-random"])
    ev = evaluate([f"sft={sft}", f"dpo={work / 'dpo_r1'}", "--tasks", "click-tab,click-link", "--exclude", "click-link",
                   "--eval-seeds", "2", "--model", "tiny-random", "--json", str(tmp_path / "eval.json"), "--free"])
    assert ev["tasks"] == ["click-tab"] and list(ev["adapters"]) == ["sft", "dpo"]
    assert len(ev["adapters"]["dpo"]["by_item"]) == 2 and "minus_baseline_points" not in ev["adapters"]["sft"]
    for row in ev["adapters"].values():  # malformed answers are counted per task, with the answers themselves
        assert sum(row["malformed_per_task"].values()) == row["malformed"] == len(row["malformed_examples"]) <= 2
        assert all(task == "click-tab" and isinstance(out, str) for task, out in row["malformed_examples"])
    d, lo, hi = ev["adapters"]["dpo"]["minus_baseline_points"]
    assert lo <= d <= hi
    assert json.loads((tmp_path / "eval.json").read_text())["adapters"]["dpo"]["per_task"].keys() == {"click-tab"}
    # Any family: tool use's items (a random model's constrained thoughts run past the token budget, so no
    # claim on malformed answers here: tests/test_constrained.py covers the masks).
    tool = evaluate([f"sft={sft}", "--env", "tooluse", "--tasks", "calculator", "--eval-seeds", "2", "--model", "tiny-random"])
    assert tool["environment"] == "tooluse" and tool["tasks"] == ["calculator"] and tool["constrained"] and not ev["constrained"]
    assert len(tool["adapters"]["sft"]["by_item"]) == 2 and all(k.startswith("calculator/") for k in tool["adapters"]["sft"]["by_item"])


def test_learning_benchmark_rounds_0_is_sft_only(tmp_path, monkeypatch):
    """`--rounds 0` trains and evaluates SFT (and the random baseline) and reports no DPO comparison."""
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "models"))
    from benchmarks.learning import main

    res = main(["--preset", "tiny", "--rounds", "0", "--eval-seeds", "2", "--json", str(tmp_path / "r0.json")])
    assert json.loads((tmp_path / "r0.json").read_text())["tasks"] == res["tasks"]
    assert res["tasks"].keys() == {"click-tab", "enter-text"}
    assert all(row.keys() == {"sft", "random", "n"} and row["n"] == 2 for row in res["tasks"].values())
    assert "mean_sft" in res and "mean_dpo" not in res and "dpo_minus_sft_points" not in res and res["rounds"] == []
    assert res["eval_success"].keys() == {"sft", "random"}


def test_learning_benchmark_rollout_overrides_reach_every_round(tmp_path, monkeypatch):
    """`--rollouts` sets the DAG's rollout_trajectories options for every round: with expert_starts each
    round's rollouts also start from the expert's states at that round's unsolved seeds (the start moves
    with the policy). A bad override fails before anything runs."""
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "models"))
    from benchmarks.learning import main

    with pytest.raises(ValueError, match="unknown rollout_trajectories option"):
        main(["--preset", "tiny", "--rollouts", '{"expert_start": true}', "--workdir", str(tmp_path / "typo")])
    with pytest.raises(ValueError, match="traces_path"):
        main(["--preset", "tiny", "--rollouts", '{"traces_path": "x.jsonl"}', "--workdir", str(tmp_path / "traces")])
    with pytest.raises(SystemExit, match="already trains on expert starts"):
        main(["--preset", "tiny", "--arms", "backplay", "--rollouts", '{"expert_starts": true}', "--workdir", str(tmp_path / "twice")])
    assert not any((tmp_path / d).exists() for d in ("typo", "traces", "twice"))
    work = tmp_path / "work"
    res = main(["--preset", "tiny", "--rounds", "2", "--arms", "none", "--eval-seeds", "1", "--workdir", str(work),
                "--rollouts", '{"expert_starts": true}'])
    assert res["rollout_config"]["expert_starts"] is True and len(res["rounds"]) == 2
    for r, stats in enumerate(res["rounds"], 1):
        eps = [json.loads(line) for line in (work / f"rollouts_r{r}.jsonl").read_text().splitlines()]
        starts = [e for e in eps if "expert_prefix" in e]
        assert stats["expert_start_episodes"] == len(starts) > 0
        solved = {(e["task"], e["seed"]) for e in eps if e["success"] and "expert_prefix" not in e}
        assert all((e["task"], e["seed"]) not in solved for e in starts)  # only where no sample of the round solved
