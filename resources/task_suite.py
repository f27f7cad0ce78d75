import dagster as dg

from dpo_driver.environment import Environment
from dpo_driver.tasks import SeedPlan


class TaskSuite(dg.ConfigurableResource):
    """The tasks and how many seeds (items) each split gets (the splits are disjoint by construction)."""

    tasks: list[str] = []  # empty = the environment family's default suite
    demo_seeds: int = 10  # golden demos per task (expert episodes)
    rollout_seeds: int = 50  # training seeds per task the policy acts on
    eval_seeds: int = 50  # held-out seeds per task for evaluation
    validation_seeds: int = 10  # expert episodes per task on a validation slice of the demo band: the SFT gate's states
    # Rollout seeds per task on a validation slice of the rollout band: their pairs are held out of DPO
    # (the preference-accuracy gate's), so holding pairs out costs the training set nothing.
    pair_validation_seeds: int = 5
    # Tasks of the family this round does not train on; evaluation checks DPO keeps the baseline's success there.
    retention_tasks: list[str] = []

    def retention_list(self, env: Environment) -> list[str]:
        if not self.retention_tasks:
            return []
        kept = env.suite(self.retention_tasks)
        trained = set(self.task_list(env)) & set(kept)
        if trained:
            raise ValueError(f"retention_tasks {sorted(trained)} are also trained on: retention is measured on tasks outside the suite")
        return kept

    def task_list(self, env: Environment) -> list[str]:
        return env.suite(self.tasks)

    def plan(self) -> SeedPlan:
        return SeedPlan.build(self.demo_seeds, self.rollout_seeds, self.eval_seeds, n_pair_validation=self.pair_validation_seeds)
