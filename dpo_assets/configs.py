"""Typed run config for each asset. Field names match the TRL/PEFT arguments they are passed to."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from dpo_driver.options import default
from dpo_driver.pairs import PairParams, ScoreWeights
from dpo_driver.policy import Sampling
from dpo_driver.runconfig import DEFAULT_SAMPLES_PER_SEED
from dpo_driver.training import DPOParams, SFTParams


class SFTAdapterConfig(dg.Config):
    demos_path: str = Field("", description="JSONL of golden demos; empty = generate them with the scripted experts on demo seeds")
    lora_r: int = Field(default(SFTParams, "lora_r"), description="LoRA rank (peft.LoraConfig.r)")
    lora_alpha: int = Field(default(SFTParams, "lora_alpha"), description="LoRA scaling (peft.LoraConfig.lora_alpha)")
    lora_dropout: float = Field(default(SFTParams, "lora_dropout"), description="peft.LoraConfig.lora_dropout")
    learning_rate: float = Field(default(SFTParams, "learning_rate"), description="trl.SFTConfig.learning_rate")
    max_steps: int = Field(default(SFTParams, "max_steps"), description="trl.SFTConfig.max_steps: the budget in optimizer steps, the same whatever "
                           "the number of demos; 0 = num_train_epochs passes with the min_steps floor")
    until_expert_match: float = Field(default(SFTParams, "until_expert_match"), description="train another round of max_steps (continuing the "
                                      "adapter) while the greedy policy matches the expert on fewer held-out demo states than this; 0 = one round")
    max_rounds: int = Field(default(SFTParams, "max_rounds"), description="cap on those rounds")
    num_train_epochs: float = Field(default(SFTParams, "num_train_epochs"), description="passes over the demos, only when max_steps is 0")
    min_steps: int = Field(default(SFTParams, "min_steps"), description="optimizer-step floor of the epoch budget (max_steps 0)")
    per_device_train_batch_size: int = Field(default(SFTParams, "per_device_train_batch_size"), description="trl.SFTConfig.per_device_train_batch_size")
    gradient_accumulation_steps: int = Field(default(SFTParams, "gradient_accumulation_steps"), description="trl.SFTConfig.gradient_accumulation_steps")
    micro_batch_size: int = Field(default(SFTParams, "micro_batch_size"), description="run each batch as micro-batches of this many demos, "
                                  "gradients summed: the same examples and loss per step, no padding to the batch's longest; 0 = one pass")
    max_length: int = Field(default(SFTParams, "max_length"), description="trl.SFTConfig.max_length (tokens); a longer demo fails training with a clear error (truncating would cut its answer off)")
    seed: int = Field(default(SFTParams, "seed"), description="training seed")
    checkpoint_steps: int = Field(default(SFTParams, "checkpoint_steps"), description="trl.SFTConfig.save_steps: a retry of this run resumes from the last checkpoint; 0 = none")
    scrub_pii: bool = Field(True, description="replace PII (dpo_driver.pii) in the demos before they are stored as training data; "
                            "the blocking check sft_adapter_pii re-scans either way")
    validation_max_new_tokens: int = Field(0, description="tokens per greedy answer when the SFT policy answers the held-out demo states "
                                           "(each round's measure and the blocking check sft_adapter_validation's); 0 = the family's")

    def sft_params(self, **more) -> SFTParams:
        """The training parameters: every field but the stage's own."""
        return SFTParams(**self.model_dump(exclude={"demos_path", "scrub_pii", "validation_max_new_tokens"}), **more)


class RolloutConfig(dg.Config):
    samples_per_seed: int = Field(DEFAULT_SAMPLES_PER_SEED, description="K: sampled episodes per task seed")
    temperature: float = Field(default(Sampling, "temperature"), description="sampling temperature (0 = greedy)")
    top_k: int = Field(default(Sampling, "top_k"), description="top-k sampling cutoff; 0 = off")
    top_p: float = Field(default(Sampling, "top_p"), description="nucleus sampling cutoff")
    strategy: str = Field(default(Sampling, "strategy"), description="'sample': K i.i.d. samples per state; 'verbs': K samples split over the verbs the "
                          "page allows, each distinct one played out greedily, and later states of successes branched the same way; 'candidates': "
                          "'verbs' plus every action the page offers (each element clicked, each quoted task string typed)")
    constrained: bool = Field(default(Sampling, "constrained"), description="hold every answer to the actions the state accepts "
                              "(Environment.answer_space; MiniWoB: each listed element's click or select, and type of free text into a text "
                              "field): no malformed answers, the choice stays the policy's; families without an answer space decode freely")
    max_new_tokens: int = Field(0, description="tokens generated per action; 0 = the family's (Environment.max_new_tokens)")
    max_steps: int = Field(0, description="steps before an episode is cut off as a failure; 0 = the task's own limit "
                           "(Environment.max_steps; MiniWoB: its expert's longest episode plus slack)")
    batch_size: int = Field(default(Sampling, "batch_size"), description="prompts per generate() call")
    seed: int = Field(0, description="sampling seed")
    traces_path: str = Field("", description="JSONL of logged agent traces (dpo_driver.traces schema) used as the episodes instead of "
                             "sampling rollouts; empty = sample rollouts in the environment")
    scrub_pii: bool = Field(True, description="replace PII (dpo_driver.pii: emails, phones, cards, IPs, IBANs) in the episodes before "
                            "they are stored as training data; the blocking check rollout_trajectories_pii re-scans either way")
    expert_starts: bool = Field(False, description="at the training seeds no sample solved, also play from the states of the family's "
                                "expert episode, its last first, back to the first state the policy no longer finishes from: "
                                "the policy's own successes and failures there pair up (backplay; needs a family with an expert; "
                                "dpo_driver.eto.expert_start_episodes)")


class PairsConfig(dg.Config):
    min_margin: float = Field(default(PairParams, "min_margin"), description="minimum score gap between chosen and rejected episode")
    max_pairs_per_prompt: int = Field(default(PairParams, "max_pairs_per_prompt"), description="cap on pairs from one state prompt (a multi-step seed has one per state)")
    rejected_must_parse: bool = Field(default(PairParams, "rejected_must_parse"), description="only well-formed (but wrong) actions may be rejected")
    shortest_chosen: bool = Field(default(PairParams, "shortest_chosen"), description="chosen must be a success with the fewest steps left from the divergence "
                                  "state (a success that wasted steps where a shorter one exists is never chosen)")
    skip_reordered: bool = Field(default(PairParams, "skip_reordered"), description="no pair where the failure's action at the divergence is "
                                 "one the success also takes later and the failure went on after it (the same actions in another order: "
                                 "what failed came later)")
    expert_fallback: bool = Field(False, description="also pair the family's expert action (chosen) with the policy's action where a "
                                  "failed episode first left the expert's path (rejected), at the rollout seeds where no sample "
                                  "succeeded: the only pairs a task the policy never solves can give (ETO-style; needs a family "
                                  "with an expert; dpo_driver.eto.with_expert_fallback)")
    validation_fraction: float = Field(0.0, description="share of each task's training pairs also held out of DPO (whole prompts, "
                                       "stratified by task; dpo_driver.dpo_gates.split_pairs) for the preference-accuracy gate. "
                                       "Rolled-out pairs need none: task_suite.pair_validation_seeds gives held-out pairs at no cost to "
                                       "training; logged traces have no such seeds and need this")
    success_weight: float = Field(default(ScoreWeights, "success"), description="episode score: weight of task success")
    reward_weight: float | None = Field(None, description="episode score: weight of the family's graded reward; unset = the family's "
                                        "own (Environment.reward_weight: 0 for MiniWoB, whose reward decays with wall-clock time, "
                                        "so nonzero makes same-seed reruns pick different pairs; 1 for SQL's partial credit)")
    step_penalty: float = Field(default(ScoreWeights, "step_penalty"), description="episode score: penalty per step")
    invalid_penalty: float = Field(default(ScoreWeights, "invalid_penalty"), description="episode score: penalty for an invalid action")

    def pair_params(self):
        from dpo_driver.pairs import PairParams

        return PairParams(self.min_margin, self.max_pairs_per_prompt, self.rejected_must_parse, self.shortest_chosen, self.skip_reordered)

    def score_weights(self, env):
        from dpo_driver.pairs import ScoreWeights

        reward = env.reward_weight if self.reward_weight is None else self.reward_weight
        return ScoreWeights(self.success_weight, reward, self.step_penalty, self.invalid_penalty)


class DPOAdapterConfig(dg.Config):
    beta: float = Field(default(DPOParams, "beta"), description="trl.DPOConfig.beta: strength of the KL tie to the reference (SFT) policy")
    loss_type: list[str] = Field(default(DPOParams, "loss_type"), description="trl.DPOConfig.loss_type; e.g. ['sigmoid', 'sft'] mixes in an SFT term on chosen")
    loss_weights: list[float] | None = Field(default(DPOParams, "loss_weights"), description="trl.DPOConfig.loss_weights, one per loss_type")
    learning_rate: float = Field(default(DPOParams, "learning_rate"), description="trl.DPOConfig.learning_rate")
    warmup_steps: int = Field(default(DPOParams, "warmup_steps"), description="trl.DPOConfig.warmup_steps: linear warm-up, in optimizer steps")
    anchor_weight: float = Field(default(DPOParams, "anchor_weight"), description="weight of an SFT loss on sft_adapter's demos added to every "
                                 "DPO step: keeps the expert's answers likely on states no pair covers; 0 = off")
    chosen_sft_steps: int = Field(default(DPOParams, "chosen_sft_steps"), description="SFT optimizer steps on the pairs' chosen side (and the demos, "
                                  "when anchored) before DPO; that adapter is DPO's start and its reference; 0 = off")
    sft_micro_batch_size: int = Field(default(DPOParams, "sft_micro_batch_size"), description="the chosen-side SFT stage runs each batch as "
                                      "micro-batches of this many records (sft_adapter.micro_batch_size); 0 = one pass")
    max_steps: int = Field(default(DPOParams, "max_steps"), description="trl.DPOConfig.max_steps: the budget in optimizer steps, the same whatever "
                           "the number of pairs; 0 = num_train_epochs passes with the min_steps floor")
    num_train_epochs: float = Field(default(DPOParams, "num_train_epochs"), description="passes over the pairs, only when max_steps is 0")
    min_steps: int = Field(default(DPOParams, "min_steps"), description="optimizer-step floor of the epoch budget (max_steps 0)")
    per_device_train_batch_size: int = Field(default(DPOParams, "per_device_train_batch_size"), description="trl.DPOConfig.per_device_train_batch_size")
    gradient_accumulation_steps: int = Field(default(DPOParams, "gradient_accumulation_steps"), description="trl.DPOConfig.gradient_accumulation_steps")
    max_length: int = Field(default(DPOParams, "max_length"), description="trl.DPOConfig.max_length (tokens); a longer pair or anchor demo fails training with a clear error (truncating would cut its answer off)")
    seed: int = Field(default(DPOParams, "seed"), description="training seed")
    checkpoint_steps: int = Field(default(DPOParams, "checkpoint_steps"), description="trl.DPOConfig.save_steps: a retry of this run resumes from the last checkpoint; 0 = none")
    shared_prompt: bool = Field(default(DPOParams, "shared_prompt"), description="one forward per pair, chosen and rejected sharing the prompt's "
                                "tokens: TRL's loss and gradient from about half the tokens; off = TRL's two rows per pair")


class EvaluationConfig(dg.Config):
    max_new_tokens: int = Field(0, description="tokens generated per action (greedy); 0 = the family's (Environment.max_new_tokens)")
    max_steps: int = Field(0, description="steps before an episode is cut off as a failure; 0 = the task's own limit "
                           "(Environment.max_steps; MiniWoB: its expert's longest episode plus slack)")
    batch_size: int = Field(16, description="prompts per generate() call")
    constrained: bool = Field(default(Sampling, "constrained"), description="hold every answer to the actions the state accepts "
                              "(Environment.answer_space; MiniWoB: each listed element's click or select, and type of free text into a text "
                              "field): no malformed answers, the choice stays the policy's; families without an answer space decode freely")
    num_envs: int = Field(0, description="sessions played at once, one batched generate per step for all of them (MiniWoB: browsers "
                          "in lockstep, dpo_driver/lockstep.py); 0 = the family's own (MiniWoB: one browser, first steps batched "
                          "across seeds; families without a browser: Environment.batch_sessions)")
    confidence: float = Field(0.95, description="level of every reported interval")
    n_boot: int = Field(10000, description="paired bootstrap resamples for the DPO - SFT difference")
    min_retention: float = Field(0.95, description="promote also needs DPO to keep this share of the baseline's success on "
                                 "task_suite.retention_tasks (tasks outside the training suite); no retention tasks = not checked")
