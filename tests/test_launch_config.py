"""Config loading: extends chains, overrides, and one-line errors that name the key and the file."""
import os
import textwrap

import pytest

from launch.config import ConfigError, RunConfig, load_config


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_extends_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", """
        trainer:
          max_steps: 10
          precision: bf16-mixed
        data:
          batch_size: 4
    """)
    child = write(tmp_path / "child.yaml", """
        extends: base.yaml
        name: child
        trainer:
          max_steps: 20
    """)
    cfg = load_config(RunConfig, child, ["data.batch_size=16", "seed=3"])
    assert cfg.name == "child"
    assert cfg.trainer.max_steps == 20  # the child wins over its base
    assert cfg.trainer.precision == "bf16-mixed"  # inherited
    assert cfg.data.batch_size == 16 and cfg.seed == 3  # overrides win over files


def test_misspelled_key_names_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", """
        trainer:
          max_stepz: 10
    """)
    with pytest.raises(ConfigError) as err:
        load_config(RunConfig, bad)
    msg = str(err.value)
    assert "trainer.max_stepz" in msg and "bad.yaml" in msg and "\n" not in msg


def test_misspelled_key_in_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "data:\n  batchsize: 3\n")
    child = write(tmp_path / "child.yaml", "extends: [base.yaml]\n")
    with pytest.raises(ConfigError, match=r"base\.yaml.*data\.batchsize"):
        load_config(RunConfig, child)


def test_wrong_type(tmp_path):
    bad = write(tmp_path / "bad.yaml", "data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*data\.batch_size"):
        load_config(RunConfig, bad)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="trainer.nope"):
        load_config(RunConfig, None, ["trainer.nope=1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, None, ["trainer.max_steps"])


def test_missing_file_and_cycle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, str(tmp_path / "nope.yaml"))
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(RunConfig, str(tmp_path / "a.yaml"))


def test_shipped_trainer_configs_load(repo_root):
    folder = os.path.join(repo_root, "configs", "trainer")
    for name in os.listdir(folder):
        cfg = load_config(RunConfig, os.path.join(folder, name))
        assert cfg.trainer.strategy in ("auto", "ddp", "fsdp")
