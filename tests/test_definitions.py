import os

import dagster as dg

from dpo_assets import definitions
from dpo_assets.presets import PRESETS
from resources import PickleIOManager

FIVE = {"sft_adapter", "rollout_trajectories", "preference_pairs", "dpo_adapter", "evaluation_report"}


def test_definitions_load_with_the_five_assets_in_order():
    defs = definitions.defs
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert FIVE <= keys
    parents = {k: {p.to_user_string() for p in graph.get(dg.AssetKey(k)).parent_keys} for k in FIVE}
    assert parents["rollout_trajectories"] == {"sft_adapter"}
    assert parents["preference_pairs"] == {"rollout_trajectories"}
    assert parents["dpo_adapter"] == {"sft_adapter", "preference_pairs"}
    assert parents["evaluation_report"] == {"sft_adapter", "dpo_adapter"}
    for job in ("dpo_loop", "dpo_loop_tiny"):
        assert defs.resolve_job_def(job) is not None


def test_deployments_offer_the_same_resource_keys():
    keysets = {name: set(r) for name, r in definitions.RESOURCES_BY_DEPLOYMENT.items()}
    assert len(set(map(frozenset, keysets.values()))) == 1, keysets
    assert set(keysets) == {"local", "prod"}
    # Values between assets go through our io_manager in every deployment, never Dagster's per-instance default.
    for name, resources in definitions.RESOURCES_BY_DEPLOYMENT.items():
        assert isinstance(resources["io_manager"], PickleIOManager), name
    assert definitions.RESOURCES_BY_DEPLOYMENT["local"]["io_manager"].root == ""  # = $DPO_HOME/io
    assert type(definitions.RESOURCES_BY_DEPLOYMENT["prod"]["io_manager"].root).__name__ == "EnvVar"  # DPO_IO_ROOT


def test_sensors_and_schedules_name_assets_that_exist():
    from dpo_assets.configs import RolloutConfig
    from dpo_assets.schedules import IMPROVEMENT_ASSETS
    from dpo_driver.runconfig import DEFAULT_SAMPLES_PER_SEED, IMPROVEMENT_ASSET_NAMES
    from sensors.regression_sensor import EVALUATION_REPORT, PREFERENCE_PAIRS

    keys = definitions.defs.resolve_asset_graph().get_all_asset_keys()
    assert {EVALUATION_REPORT, PREFERENCE_PAIRS} <= keys
    assert tuple(a.key.to_user_string() for a in IMPROVEMENT_ASSETS) == IMPROVEMENT_ASSET_NAMES
    assert RolloutConfig.model_fields["samples_per_seed"].default == DEFAULT_SAMPLES_PER_SEED


def test_presets_are_valid_run_config_for_the_job():
    job = definitions.defs.resolve_job_def("dpo_loop")
    for name, cfg in PRESETS.items():
        assert job.run_config_schema.config_type is not None
        result = dg.validate_run_config(job, cfg)
        assert result, name


@dg.op
def parent_cmdline() -> str:
    with open(f"/proc/{os.getppid()}/cmdline") as f:
        return f.read().replace("\0", " ")


@dg.job(executor_def=definitions.EXECUTOR)
def forked_job():
    parent_cmdline()


def test_steps_fork_from_a_server_that_imported_the_definitions(tmp_path, monkeypatch):
    """Each step still gets its own process, but forked from one that imported the code location
    once: a spawned step paid ~12 s of imports before it began."""
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # the step processes import this module by name
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        with dg.execute_job(dg.reconstructable(forked_job), instance=instance) as result:
            assert result.success
            parent = result.output_for_node("parent_cmdline")
    assert "multiprocessing.forkserver" in parent and "dpo_assets.definitions" in parent
    assert definitions.defs.resolve_job_def("dpo_loop").executor_def is definitions.EXECUTOR
