"""DPO's optimizer steps with and without the shared prompt, on one run's pairs, side by side.

Trains the default preset's DPO (beta, losses, rate, demo anchor) for `--steps` steps from an SFT
adapter on a pairs file, once with TRL's two rows per pair and once with one packed row per pair
(`DPOParams.shared_prompt`, dpo_driver/shared_prompt.py), and prints seconds per step (the best of `--repeats` alternating runs), the speedup,
and how far apart the two trained adapters and their losses are (bf16 rounding only, when the
packing is right). The chosen-side SFT stage is left out: the packing does not touch it. Writes
JSON with its command. After `bash scripts/run_pipeline.sh`:

    run=$(ls -td .dpo_home/artifacts/preference_pairs/*/ | head -1 | xargs basename)
    .venv/bin/python benchmarks/dpo_step.py --pairs .dpo_home/artifacts/preference_pairs/$run/pairs.jsonl \\
        --sft-adapter .dpo_home/artifacts/sft_adapter/$run/adapter --demos .dpo_home/artifacts/sft_adapter/$run/demos.jsonl \\
        --json benchmarks/results/dpo_shared_prompt.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: `benchmarks` is not installed
from safetensors.torch import load_file  # noqa: E402

from dpo_driver.io import atomic_write_text, read_jsonl  # noqa: E402
from dpo_driver.runconfig import op_configs, preset  # noqa: E402
from dpo_driver.training import DPOParams, train_dpo  # noqa: E402

TRL_KEYS = ("prompt", "chosen", "rejected")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=Path, required=True, help="a preference_pairs pairs.jsonl")
    ap.add_argument("--sft-adapter", type=Path, required=True, help="the SFT adapter DPO starts from")
    ap.add_argument("--demos", type=Path, help="sft_adapter's demos.jsonl, the anchor (the preset's anchor_weight needs it)")
    ap.add_argument("--model", default=preset("default")["resources"]["policy_model"]["config"]["model"])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per arm")
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating arms (the first run also pays warm-up)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    cfg = op_configs(preset("default"))["dpo_adapter"]
    base = replace(DPOParams(**cfg), chosen_sft_steps=0, max_steps=args.steps, logging_steps=1)
    records = [{k: r[k] for k in TRL_KEYS} for r in read_jsonl(args.pairs)]
    anchor = read_jsonl(args.demos) if args.demos else None
    if base.anchor_weight > 0 and not anchor:
        raise SystemExit("the default preset anchors DPO on the SFT demos: pass --demos (sft_adapter's demos.jsonl)")
    runs, adapters = [], {}
    with tempfile.TemporaryDirectory(prefix="dpo-step-") as tmp:
        for rep in range(args.repeats):
            for shared in (False, True):
                t0 = time.perf_counter()
                out = train_dpo(args.model, args.sft_adapter, records, Path(tmp) / f"shared{int(shared)}-{rep}",
                                replace(base, shared_prompt=shared), anchor=anchor)
                wall = time.perf_counter() - t0
                adapters[shared] = load_file(out.adapter_dir / "adapter_model.safetensors")
                runs.append({"shared_prompt": shared, "repeat": rep, "train_runtime_s": out.metrics["train_runtime"], "wall_s": wall,
                             "losses": [log["loss"] for log in out.log_history if "loss" in log]})
    rows = []
    for shared in (False, True):
        mine = [r for r in runs if r["shared_prompt"] == shared]
        best = min(r["train_runtime_s"] for r in mine)
        rows.append({"arm": "shared prompt" if shared else "two rows per pair (TRL)", "shared_prompt": shared,
                     "train_runtime_s": best, "s_per_step": best / args.steps, "runs_s": [r["train_runtime_s"] for r in mine]})
    two, one = rows
    one["speedup"] = two["train_runtime_s"] / one["train_runtime_s"]
    a, b = adapters[False], adapters[True]
    moved = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    losses = {shared: next(r["losses"] for r in runs if r["shared_prompt"] == shared) for shared in (False, True)}
    loss_gap = max(abs(x - y) for x, y in zip(losses[False], losses[True], strict=True))
    print(f"{'arm':28} {'s/step':>8} {'best s':>8} {'speedup':>8}  runs s")
    for r in rows:
        print(f"{r['arm']:28} {r['s_per_step']:8.2f} {r['train_runtime_s']:8.1f} {r.get('speedup', 1.0):8.2f}  "
              + " ".join(f"{x:.1f}" for x in r["runs_s"]))
    print(f"{len(records)} pairs, {args.steps} steps; largest per-step loss gap {loss_gap:.4f}; "
          f"adapters differ by at most {moved:.2e} (largest weight {scale:.2e})")
    result = {"command": shlex.join(sys.argv), "model": args.model, "pairs": len(records), "steps": args.steps,
              "repeats": args.repeats,
              "params": {k: v for k, v in vars(base).items() if k != "shared_prompt"}, "rows": rows, "runs": runs,
              "max_loss_gap": loss_gap, "max_adapter_diff": moved, "max_adapter_weight": scale}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
