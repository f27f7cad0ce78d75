"""The PII gate through a real materialize: planted PII that survives blocks the pairs stage;
the same episodes scrubbed pass."""

import dagster as dg
import pandas as pd
import pytest

from dpo_assets.checks import rollout_trajectories_pii
from dpo_driver.pii import scrub_records
from resources import MLflowTracker

pytestmark = pytest.mark.slow

EPISODE = {"episode_id": "p:login-user:1000001:0", "task": "login-user", "seed": 1000001, "success": True,
           "steps": [{"step": 0, "prompt": "Task: Log in as ana@example.com, card 4111 1111 1111 1111.\nNext action:",
                      "output": 'type textbox "ana@example.com"', "action": 'type textbox "ana@example.com"'}]}


def run_with(episodes: list[dict], tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path))

    @dg.asset(name="rollout_trajectories")
    def episodes_stand_in() -> pd.DataFrame:
        return pd.DataFrame(episodes)

    @dg.asset(name="preference_pairs", deps=["rollout_trajectories"])
    def pairs_stand_in() -> None:
        pass

    with dg.instance_for_test() as instance:
        result = dg.materialize([episodes_stand_in, rollout_trajectories_pii, pairs_stand_in], resources={"tracker": MLflowTracker()},
                                instance=instance, raise_on_error=False)
    check = result.get_asset_check_evaluations()[0]
    paired = "preference_pairs" in {m.asset_key.to_user_string() for m in result.get_asset_materialization_events()}
    return result, check, paired


def test_surviving_pii_blocks_the_pairs(tmp_path, monkeypatch):
    result, check, paired = run_with([EPISODE], tmp_path, monkeypatch)
    assert not result.success and not paired and not check.passed
    assert check.metadata["surviving_email_address"].value == 3 and check.metadata["surviving_credit_card"].value == 1
    assert "EMAIL_ADDRESS x3" in check.description and "scrub_pii" in check.description


def test_scrubbed_episodes_pass(tmp_path, monkeypatch):
    scrubbed, found = scrub_records([EPISODE])
    assert found == {"EMAIL_ADDRESS": 3, "CREDIT_CARD": 1}  # prompt, output and action each carried the address
    assert scrubbed[0]["steps"][0]["output"] == 'type textbox "<EMAIL_ADDRESS>"'
    result, check, paired = run_with(scrubbed, tmp_path, monkeypatch)
    assert result.success and paired and check.passed
