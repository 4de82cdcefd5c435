"""Reward functions for RL (GRPO) and best-of-N: task checkers, format, verifier/reward-model scores, sandboxed code execution."""
