import json

import pytest

from dpo_driver.demos import load_demos
from dpo_driver.io import atomic_dir, atomic_write_text
from dpo_driver.families.miniwob import MiniWoB, check_tasks
from dpo_driver.tasks import BAND, SeedPlan, seeds_for, split_of


def test_seed_splits_are_disjoint_bands():
    plan = SeedPlan.build(n_demo=10, n_rollout=50, n_eval=50)
    assert set(plan.eval).isdisjoint(set(plan.demo) | set(plan.rollout))
    assert {split_of(s) for s in plan.demo} == {"demo"}
    assert {split_of(s) for s in plan.rollout} == {"rollout"}
    assert {split_of(s) for s in plan.eval} == {"eval"}


def test_eval_offset_gives_a_fresh_held_out_range():
    default, fresh = SeedPlan.build(5, 20, 50), SeedPlan.build(5, 20, 50, eval_offset=1000)
    assert set(default.eval).isdisjoint(fresh.eval)
    assert {split_of(s) for s in fresh.eval} == {"eval"}
    assert fresh.demo == default.demo and fresh.rollout == default.rollout


def test_seed_plan_rejects_overlap():
    with pytest.raises(AssertionError, match="evaluation seeds overlap"):
        SeedPlan(demo=(1, 2), rollout=(BAND,), eval=(2,))


def test_pair_validation_seeds_are_a_disjoint_slice_of_the_rollout_band():
    plan = SeedPlan.build(5, 20, 50, n_pair_validation=5)
    assert {split_of(s) for s in plan.pair_validation} == {"rollout"} and len(plan.pair_validation) == 5
    assert set(plan.pair_validation).isdisjoint(plan.rollout) and plan.rollout == SeedPlan.build(5, 20, 50).rollout
    with pytest.raises(ValueError, match="reach the validation slice"):
        SeedPlan.build(5, BAND // 2 + 1, 5, n_pair_validation=1)
    with pytest.raises(AssertionError, match="pair-validation seeds overlap"):
        SeedPlan(demo=(1,), rollout=(BAND,), eval=(2 * BAND,), pair_validation=(BAND,))


def test_a_split_cannot_grow_into_the_next_band():
    with pytest.raises(ValueError, match="must fit"):
        seeds_for("rollout", count=10, offset=BAND - 5)


@pytest.mark.parametrize("tasks, msg", [([], "empty"), (["click-buton"], "unknown task 'click-buton'"), (["click-tab", "click-tab"], "twice")])
def test_check_tasks_rejects_bad_suites(tasks, msg):
    with pytest.raises(ValueError, match=msg):
        check_tasks(tasks)


def _write(tmp_path, lines):
    p = tmp_path / "demos.jsonl"
    p.write_text("".join(lines))
    return p


def test_load_demos_accepts_the_three_formats(tmp_path):
    p = _write(
        tmp_path,
        [
            json.dumps({"prompt": "Task: a", "completion": 'click button "a"'}) + "\n",
            json.dumps({"prompt": [{"role": "user", "content": "Task: b"}], "completion": [{"role": "assistant", "content": 'click link "b"'}], "task": "click-link"}) + "\n",
            "\n",
            json.dumps({"messages": [{"role": "user", "content": "Task: c"}, {"role": "assistant", "content": 'type textbox "c"'}]}) + "\n",
        ],
    )
    demos = load_demos(p, MiniWoB)
    assert [d["completion"][0]["content"] for d in demos] == ['click button "a"', 'click link "b"', 'type textbox "c"']
    assert demos[1]["prompt"] == [{"role": "user", "content": "Task: b"}] and demos[1]["task"] == "click-link"


@pytest.mark.parametrize(
    "lines, msg",
    [
        ([], "holds no demonstrations"),
        (["{not json\n"], "line 1: not valid JSON"),
        (['["a list"]\n'], "line 1: expected a JSON object"),
        ([json.dumps({"prompt": "x"}) + "\n"], "line 1: needs 'prompt' and 'completion'"),
        ([json.dumps({"prompt": "x", "completion": "click the button"}) + "\n"], "line 1: completion 'click the button' is not an action"),
        ([json.dumps({"prompt": "", "completion": 'click button "a"'}) + "\n"], "line 1: empty prompt"),
        ([json.dumps({"prompt": "x", "completion": 'click button "a"', "seed": 2 * BAND + 3}) + "\n"], "evaluation seed"),
    ],
)
def test_load_demos_rejects_bad_files_naming_file_and_line(tmp_path, lines, msg):
    p = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=msg) as e:
        load_demos(p, MiniWoB)
    assert str(p) in str(e.value)


def test_load_demos_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_demos(tmp_path / "nope.jsonl", MiniWoB)


def test_atomic_dir_keeps_old_output_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        atomic_write_text(d / "a.txt", "v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            atomic_write_text(d / "a.txt", "half")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch left behind
    with atomic_dir(target) as d:
        atomic_write_text(d / "b.txt", "v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_hold_out_keeps_every_tenth_demo_for_validation():
    from dpo_driver.demos import hold_out

    records = [{"i": i} for i in range(25)]
    train, val = hold_out(records)
    assert [r["i"] for r in val] == [9, 19] and len(train) == 23 and not {r["i"] for r in val} & {r["i"] for r in train}
    assert hold_out(records[:3]) == (records[:2], records[2:3])  # fewer than ten: the last one
    assert hold_out(records[:1]) == (records[:1], [])


def test_training_demos_scrub_user_demos_and_replay_the_expert_for_validation(tmp_path):
    from dpo_driver.demos import generate_demos, training_demos
    from dpo_driver.families.tooluse import ToolUse
    from dpo_driver.io import atomic_write_jsonl

    env = ToolUse()
    mine = generate_demos(env, ["calculator"], [0, 1])
    mine[0]["prompt"][0]["content"] += " Reply to jane.doe@example.com."
    atomic_write_jsonl(tmp_path / "mine.jsonl", mine)
    data = training_demos(env, ["calculator"], [0, 1], [500, 501], tmp_path / "mine.jsonl")
    assert data.source == str(tmp_path / "mine.jsonl") and len(data.demos) == len(mine)
    assert data.pii["pii_email_address"] == 1 and "jane.doe" not in json.dumps(data.demos)
    assert {r["seed"] for r in data.validation} == {500, 501}  # held-out states from the expert, not from the user's demos
    with pytest.raises(ValueError, match="no golden demonstrations"):
        training_demos(env, ["calculator"], [], [500])  # no demo seed: nothing to train on
