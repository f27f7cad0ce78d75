"""Same seed, same machine: the same rollouts and the same pairs (the benchmark compares their hash).

A tiny model fitted to click-tab demos samples answers that sometimes succeed and sometimes fail,
so real pairs form; two runs from the same adapter and seeds must agree action for action.
"""

import hashlib

import pytest

from dpo_driver.demos import generate_demos
from dpo_driver.pairs import PairParams, ScoreWeights, build_preference_pairs
from dpo_driver.policy import LMPolicy, Sampling
from dpo_driver.rollouts import run_episodes
from dpo_driver.tasks import seeds_for
from dpo_driver.training import SFTParams, load_policy, train_sft

pytestmark = pytest.mark.slow


def test_same_seed_rollouts_give_the_same_pairs(tmp_path, monkeypatch, miniwob):
    monkeypatch.setenv("DPO_DRIVER_CACHE", str(tmp_path / "models"))
    demos = generate_demos(miniwob, ["click-tab"], seeds_for("demo", 6))
    sft = train_sft("tiny-random", demos, tmp_path / "sft", SFTParams(max_steps=0, min_steps=0, num_train_epochs=10.0, learning_rate=1e-2, per_device_train_batch_size=4))
    sampling = Sampling(temperature=0.7, top_k=3, max_new_tokens=12, strategy="verbs")

    def run() -> tuple[list, int, str]:
        model, tok = load_policy("tiny-random", sft.adapter_dir)
        eps = run_episodes(LMPolicy(model, tok, miniwob), miniwob, ["click-tab"], seeds_for("rollout", 4), 4, sampling, max_steps=2)
        pairs = build_preference_pairs(eps, PairParams(rejected_must_parse=False), ScoreWeights())
        outcome = [(e["episode_id"], [s["output"] for s in e["steps"]], e["success"]) for e in eps]
        return outcome, len(pairs), hashlib.sha256(pairs.to_json(orient="records").encode()).hexdigest()

    first, second = run(), run()
    assert first[1] > 0, "the fitted tiny model should both succeed and fail on some page"
    assert first == second
