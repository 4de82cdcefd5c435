"""The `lmlab` command: one verb per stage.

    lmlab corpus     --config configs/stages/corpus.yaml  sources.0.kind=stdlib
    lmlab tokenizer  --config ...   vocab_size=8192
    lmlab pack | pretrain | eval | generate | report | export | bench | pipeline

Each verb has a `Config` (pydantic) in its module; `lmlab VERB --help` lists every option
with its type, default and meaning. Overrides are `key.sub=value` (values read as YAML).
User errors print one line and exit 2; Ctrl-C stops cleanly with exit 130 and the same
command resumes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmlab.errors import Interrupted, UserError
from lmlab.stages import STAGES, training_verbs


def _load_stage(name: str):
    return importlib.import_module(STAGES[name][0])


def _launched_on_several_processes() -> bool:
    import os

    if "WORLD_SIZE" not in os.environ and "SLURM_NTASKS" not in os.environ:
        return False  # the common case, without importing torch
    from lmlab.dist import read_env

    return read_env().world > 1


def build_stage_parser(name: str, module) -> argparse.ArgumentParser:
    from lmlab.config import describe

    doc = (module.__doc__ or "").strip()
    epilog = "options (set in --config YAML or as key.sub=value overrides):\n" + "\n".join(describe(module.Config))
    p = argparse.ArgumentParser(
        prog=f"lmlab {name}", description=doc, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with option values (overrides follow it)")
    for flag, (field, value, help_text) in getattr(module, "FLAGS", {}).items():
        p.add_argument(flag, dest="flag_" + field, action="store_const", const=value, help=help_text)
    positional = getattr(module, "POSITIONAL", None)
    if positional:
        field, help_text = positional
        p.add_argument("positional", nargs="?", metavar=field.upper().lstrip("-"), help=help_text)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order")
    return p


def run_stage(name: str, argv: list[str]):
    """Parse `argv` for stage `name`, build its config and run it. Returns the stage's result."""
    from lmlab.config import load_config, stage_arguments

    if _launched_on_several_processes() and name not in (*training_verbs(), "pipeline"):
        raise UserError(f"`lmlab {name}` runs in one process; under torchrun or srun only the training verbs "
                        f"({', '.join(training_verbs())}) and `pipeline` (which runs the other stages on rank 0) "
                        f"are launched: run `lmlab {name} ...` directly")
    module = _load_stage(name)
    if hasattr(module, "main"):  # a verb with its own argument parsing (e.g. `lmlab slurm VERB ...`)
        return module.main(argv)
    if "-h" in argv or "--help" in argv:
        build_stage_parser(name, module).parse_args(["--help"])  # prints every option, exits 0
    config_file, overrides = stage_arguments(name, module, argv)
    cfg = load_config(module.Config, config_file, overrides)
    return module.run(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(
        prog="lmlab",
        description="lmlab: train small language models end to end.\n\nverbs:\n" + "\n".join(
            f"  {k:<10} {v[1]}" for k, v in STAGES.items()) + "\n\nRun `lmlab VERB --help` for a verb's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="store_true", help="print the version and exit")
    top.add_argument("verb", nargs="?", choices=list(STAGES), metavar="VERB")
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in STAGES:
        ns = top.parse_args(argv[:1])
        if ns.version:
            from lmlab import __version__
            print(__version__)
            return 0
        top.print_help()
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        run_stage(argv[0], argv[1:])
        if "lmlab.dist" in sys.modules:  # leave the process group cleanly (NCCL warns otherwise)
            sys.modules["lmlab.dist"].shutdown()
    except UserError as e:
        # Only a stage that joined a process group has ranks (and imported torch); keep the
        # error path of the others free of the torch import.
        stream, prefix = sys.modules["lmlab.dist"].error_stream() if "lmlab.dist" in sys.modules else (sys.stderr, "")
        if not (prefix and isinstance(e, Interrupted)):  # rank 0 already said where the checkpoint is
            print(f"{prefix}error: {e}", file=stream)
        return e.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: stopped cleanly; run the same command again to continue.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `lmlab generate ... | head`; not an error worth a traceback.
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
