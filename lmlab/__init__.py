"""lmlab: a laboratory for training small language models end to end.

Raw text -> corpus -> tokenizer -> packed shards -> pretraining -> evaluation -> report ->
export. Every stage is a function from artifact directories to one new artifact directory;
`lmlab.cli` exposes each as a command. See README.md for the tour.
"""

__version__ = "0.1.0"
