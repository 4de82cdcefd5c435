"""The verbs of `lmlab`: each stage's module (which has `Config` and `run(cfg)`) and a one-line summary.

A plain table, importing nothing, so the CLI and the pipeline runner (which runs stages by
verb) both read it without the pipeline importing the CLI.
"""

from __future__ import annotations

# verb -> (module, one-line summary)
STAGES: dict[str, tuple[str, str]] = {
    "corpus": ("lmlab.data.corpus", "collect, clean, deduplicate and shard raw text"),
    "tokenizer": ("lmlab.data.tokenizer", "train (or import) the tokenizer once, fingerprinted"),
    "pack": ("lmlab.data.pack", "tokenize a corpus and pack it into fixed-length memmap shards"),
    "pretrain": ("lmlab.train.pretrain", "train a model (transformer or griffin) from scratch on packed data"),
    "tasks": ("lmlab.tasks.stage", "write the embedded verifiable tasks as SFT / DPO / test data files"),
    "puzzles": ("lmlab.data.puzzles.stage", "make or import puzzle sets (Sudoku, mazes, ARC) for TRM"),
    "sft": ("lmlab.train.sft", "supervised finetuning on conversations or raw prompt/completion data (Herald_proofs): full or LoRA (PEFT)"),
    "pairs": ("lmlab.tasks.pairs", "on-policy DPO pairs: sample a chat model on problems, the task checkers pick"),
    "dpo": ("lmlab.train.dpo", "direct preference optimisation on chosen/rejected pairs"),
    "samples": ("lmlab.tasks.samples", "k labelled samples per problem from a chat model (verifier / reward data), in chunks"),
    "hidden-pairs": ("lmlab.tasks.hidden_pairs", "LLM-TRM phase 2 data: a thinking LLM's hidden states before and "
                     "after it thinks, per problem, in chunks (resumable)"),
    "verifier": ("lmlab.train.verifier", "train an outcome verifier: (problem, solution) -> P(correct)"),
    "reward": ("lmlab.train.reward_model", "train a Bradley-Terry reward model on preference pairs"),
    "compressor": ("lmlab.train.compressor", "LLM-TRM phase 1: compress a frozen LLM's hidden states D -> D' "
                   "(tied linear), on text and its own thinking, against the best linear map"),
    "seqtrm": ("lmlab.train.seqtrm", "LLM-TRM phase 2: a SequenceTRM predicts the compressed state after thinking from "
               "the compressed prompt, deep supervision with halting, against its baselines"),
    "latent": ("lmlab.train.latent", "LLM-TRM phase 3: train the reasoner to make a frozen LLM answer from latent "
               "vectors in place of its thinking (answer likelihood, or GRPO)"),
    "grpo": ("lmlab.train.grpo", "GRPO: RL with verifiable rewards, G completions per prompt, group advantages"),
    "trm": ("lmlab.train.trm", "train a tiny recursive reasoning model (TRM) on a puzzle set, with ACT deep supervision"),
    "puzzle-eval": ("lmlab.eval.puzzles", "evaluate a TRM on a puzzle split: exact accuracy by step, rating, halting; ARC votes"),
    "llm-trm-eval": ("lmlab.eval.llm_trm", "LLM-TRM's outcome table: exact match, tokens and time answering with "
                     "thinking, directly, with the reasoner's latent vectors, and by its first token"),
    "eval": ("lmlab.eval.evaluate", "perplexity / bits per byte, generative exact match / pass@k, multiple choice, Lean proofs, sample generations"),
    "generate": ("lmlab.infer.generate", "generate text from a model with a KV cache"),
    "chat": ("lmlab.infer.chat", "chat with a model in the terminal, using its chat template"),
    "serve": ("lmlab.serve.stage", "an OpenAI-compatible server (continuous batching, streaming) with a web chat"),
    "report": ("lmlab.report.report", "write report.md with plots from a pipeline's artifacts"),
    "export": ("lmlab.models.export", "export a model to a Hugging Face directory or a GGUF file (llama.cpp, Ollama)"),
    "import": ("lmlab.models.importer", "import a Hugging Face (Llama/SmolLM, Mistral, Qwen2, Qwen3, SmolLM3, "
               "RecurrentGemma) or DeepMind recurrentgemma checkpoint as an lmlab model"),
    "pipeline": ("lmlab.pipeline", "run a list of stages from a pipeline YAML"),
    "bench": ("lmlab.bench", "benchmarks against a peer in the same run: transformers (train, generate), TRL (grpo), official TRM (trm), recurrentgemma (griffin); decode against context; serve under concurrent clients"),
    "tpu": ("lmlab.tpu", "print (and --run) the gcloud commands that copy, install and run a verb on every worker of a Cloud TPU VM"),
    "slurm": ("lmlab.slurm", "write (and --submit) an sbatch script that runs a training verb on N nodes x G GPUs"),
    "plan": ("lmlab.plan", "estimate per-GPU memory and tokens/s of a training run before launching it"),
    "sweep": ("lmlab.sweep", "hyperparameter search with Optuna: each trial a run directory, shared storage, pruning"),
}


# Stages in lmlab/train that run in one process (small models on cached states): under torchrun
# the pipeline runs them on rank 0, as it does every stage that is not a training verb.
ONE_PROCESS = ("compressor", "latent")


def training_verbs() -> list[str]:
    """The training stages (in lmlab/train): they resume from checkpoints and run on several processes."""
    return [verb for verb, (module, _) in STAGES.items() if module.startswith("lmlab.train.")
            and verb not in ONE_PROCESS]
