"""The TRL side of `lmlab bench grpo`: time GRPOTrainer steps on an exported model (run in the peer venv).

    .peers/trl/bin/python scripts/peers/trl_grpo.py --model HF_DIR --prompts prompts.json --out times.json \\
        --num-generations 8 --max-completion-length 64 --steps 3 --lr 1e-5 --beta 0.0

Runs in its own virtual environment (scripts/setup_peers.sh installs torch and trl there), so
lmlab's environment never needs TRL; it imports nothing from lmlab. `prompts.json` holds
{"questions": [...], "answers": [...]} (GSM8K-format answers ending `#### N`); the reward is
the exact answer by the strict `#### N` rule, the same one lmlab's `exact` reward applies to
arithmetic problems. Each optimizer step is timed (a TrainerCallback), and inside it the
generation (`_generate`: transformers' generate) and the whole rollout
(`_generate_and_score_completions`: generation + rewards + reference/old log-probs), so the
split is generation / scoring and reference / update. Writes per-step times and completion
lengths as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import time

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")


def _answer(text: str):
    m = STRICT.search(text)
    if not m:
        return None
    return m.group(1).replace(",", "").replace("$", "").rstrip(".").strip().lower()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    data = json.load(open(args.prompts))
    questions, answers = data["questions"], data["answers"]
    refs = [_answer(a) for a in answers]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in questions], "ref": refs})
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    def exact(prompts, completions, ref, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if _answer(t) is not None and _answer(t) == r else 0.0 for t, r in zip(texts, ref)]

    n = len(questions) * args.num_generations
    cfg = GRPOConfig(output_dir=args.out + ".trainer", per_device_train_batch_size=n, gradient_accumulation_steps=1,
                     num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                     max_steps=args.steps, learning_rate=args.lr, beta=args.beta, temperature=1.0, top_p=1.0,
                     top_k=0, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, seed=args.seed, shuffle_dataset=False,
                     disable_dropout=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact], args=cfg, train_dataset=ds, processing_class=tok)

    timings = {"generate": [], "rollout": [], "step": [], "lengths": []}
    gen_t = [0.0]
    orig_generate = trainer._generate
    orig_rollout = trainer._generate_and_score_completions

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = orig_generate(*a, **k)
        gen_t[0] += time.perf_counter() - t
        return out

    def timed_rollout(*a, **k):
        gen_t[0] = 0.0
        t = time.perf_counter()
        out = orig_rollout(*a, **k)
        timings["rollout"].append(time.perf_counter() - t)
        timings["generate"].append(gen_t[0])
        timings["lengths"].append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    trainer._generate = timed_generate
    trainer._generate_and_score_completions = timed_rollout

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            timings["step"].append(time.perf_counter() - self.t)

    trainer.add_callback(StepTimer())
    trainer.train()
    json.dump({**timings, "trl": __import__("trl").__version__, "torch": torch.__version__,
               "threads": torch.get_num_threads()}, open(args.out, "w"))


if __name__ == "__main__":
    main()
