"""Config loading: YAML + overrides, validation messages, --help rendering, pipeline substitution."""

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from lmlab.config import Strict, describe, load_config, parse_override
from lmlab.errors import UserError


class Inner(Strict):
    steps: int = Field(10, description="how many steps")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="lr schedule")


class Item(Strict):
    path: str
    weight: float = 1.0


class Outer(Strict):
    name: str = Field("x", description="a name")
    train: Inner = Field(default_factory=Inner, description="training options")
    data: list[Item] = Field(default_factory=list)


def test_defaults_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\ntrain:\n  steps: 5\n")
    cfg = load_config(Outer, f, ["train.steps=7", "data=[{path: a}, {path: b, weight: 2}]", "data.1.weight=0.5"])
    assert cfg.name == "fromfile" and cfg.train.steps == 7 and cfg.train.schedule == "cosine"
    assert [d.path for d in cfg.data] == ["a", "b"] and cfg.data[1].weight == 0.5


def test_override_values_are_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=hello world") == (["a"], "hello world")
    assert parse_override("title=Run 2: more steps") == (["title"], "Run 2: more steps")  # text with a colon
    assert parse_override("a={b: 1}") == (["a"], {"b": 1})  # a mapping is written in flow style
    with pytest.raises(UserError, match="key.sub=value"):
        parse_override("novalue")


def test_unknown_key_names_valid_keys():
    with pytest.raises(UserError) as e:
        load_config(Outer, None, ["train.stpes=3"])
    msg = str(e.value)
    assert "unknown config key 'train.stpes'" in msg and "schedule, steps" in msg


def test_wrong_type_and_choices_are_named():
    with pytest.raises(UserError, match=r"'train.steps'.*valid integer.*'abc'"):
        load_config(Outer, None, ["train.steps=abc"])
    with pytest.raises(UserError) as e:
        load_config(Outer, None, ["train.schedule=linear"])
    assert "'cosine'" in str(e.value) and "'wsd'" in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Outer, bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(Outer, lst)


def test_describe_lists_every_option():
    lines = "\n".join(describe(Outer))
    for key in ("name", "train.steps", "train.schedule", "data"):
        assert f"  {key}  " in lines
    assert "how many steps" in lines and "'cosine' | 'wsd'" in lines


def test_pipeline_substitutes_root_and_validates_every_stage_first(tmp_path):
    from lmlab import pipeline

    cfg = load_config(pipeline.Config, None, [
        f"root={tmp_path}",
        "stages=[{stage: corpus, config: {out: '{root}/corpus', bogus_key: 1}}]",
    ])
    with pytest.raises(UserError, match=r"stage 0 \(corpus\).*unknown config key 'bogus_key'"):
        pipeline.run(cfg)


def test_pipeline_root_that_is_a_file_is_refused(tmp_path):
    from lmlab import pipeline

    f = tmp_path / "notes"
    f.write_text("mine")
    for root in (f, f / "below"):
        cfg = load_config(pipeline.Config, None, [f"root={root}", "stages=[{stage: tasks, config: {out: '{root}/t'}}]"])
        with pytest.raises(UserError, match=r"is \(or is below\) a file, not a directory; choose another root"):
            pipeline.run(cfg)
    assert f.read_text() == "mine"


def _lmlab(*args):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=120)


def test_cli_help_and_unknown_verb():
    r = _lmlab("--help")
    assert r.returncode == 0
    for verb in ("corpus", "tokenizer", "pack", "pretrain", "eval", "generate", "report", "export", "pipeline", "bench"):
        assert verb in r.stdout
    assert _lmlab("frobnicate").returncode == 2


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    r = _lmlab("pipeline", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: config file not found") and "Traceback" not in r.stderr


def test_cli_accepts_config_between_positional_and_overrides(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("max_batches: 2\n")
    r = _lmlab("eval", str(tmp_path / "no-model"), "--config", str(cfg), "batch_size=4")
    assert r.returncode == 2, r.stderr
    assert "unrecognized arguments" not in r.stderr and "model directory not found" in r.stderr


PIPELINES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("name", PIPELINES)
def test_shipped_pipelines_validate(name):
    """Every stage config in the shipped pipelines is valid (so a typo fails here, not mid-run)."""
    import importlib
    from pathlib import Path

    from lmlab import pipeline
    from lmlab.cli import STAGES

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(pipeline.Config, root / "configs" / "pipelines" / f"{name}.yaml")
    for entry in cfg.stages:
        module = importlib.import_module(STAGES[entry.stage][0])
        load_config(module.Config, None, base=pipeline._substitute(entry.config, cfg.root))


@pytest.mark.parametrize("path,verb", [("grpo/gsm8k.yaml", "grpo"), ("verifier/gsm8k.yaml", "verifier"),
                                       ("griffin/herald_tpu_v4_8.yaml", "sft")])
def test_shipped_stage_recipes_validate(path, verb):
    """The GSM8K recipes load as their stage's config (a renamed option fails here, not on a GPU)."""
    import importlib
    from pathlib import Path

    from lmlab.cli import STAGES

    module = importlib.import_module(STAGES[verb][0])
    load_config(module.Config, Path(__file__).resolve().parent.parent / "configs" / path)
