import dagster as dg

from dpo_driver.tasks import DEFAULT_TASKS, SeedPlan, check_tasks


class TaskSuite(dg.ConfigurableResource):
    """The MiniWoB++ tasks and how many seeds each split gets (the splits are disjoint by construction)."""

    tasks: list[str] = list(DEFAULT_TASKS)
    demo_seeds: int = 10  # golden demos per task (expert episodes)
    rollout_seeds: int = 50  # training seeds per task the policy acts on
    eval_seeds: int = 50  # held-out seeds per task for evaluation
    validation_seeds: int = 10  # expert episodes per task on a validation slice of the demo band: the SFT gate's states

    def task_list(self) -> list[str]:
        return check_tasks(self.tasks)

    def plan(self) -> SeedPlan:
        return SeedPlan.build(self.demo_seeds, self.rollout_seeds, self.eval_seeds)
