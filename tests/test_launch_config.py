"""Config loading: extends chains, overrides, and one-line errors that name the key and the file."""
import os
import re
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


def test_shipped_trainer_configs_pass_the_checks_and_build_their_strategy(repo_root):
    """Every shipped trainer config passes the start-up checks and names a strategy build_strategy builds (a
    misspelled one, e.g. 'dpp', is refused there)."""
    from launch.config import check_values
    from launch.trainer import build_strategy

    folder = os.path.join(repo_root, "configs", "trainer")
    for name in os.listdir(folder):
        cfg = load_config(RunConfig, os.path.join(folder, name))
        check_values(cfg)
        strategy = build_strategy(cfg.trainer)
        assert (strategy == "auto") == (cfg.trainer.strategy == "auto"), name
    with pytest.raises(ConfigError, match="trainer.strategy must be auto, ddp or fsdp, got 'dpp'"):
        build_strategy(load_config(RunConfig, None, ["trainer.strategy=dpp"]).trainer)


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=0", "trainer.max_steps must be >= 1, got 0"),
    ("trainer.val_check_interval=-1", "trainer.val_check_interval must be >= 1"),
    ("trainer.devices=0", "trainer.devices must be 'auto' or >= 1, got 0"),
    ("trainer.max_time=ten minutes", "trainer.max_time must be DD:HH:MM:SS, got 'ten minutes'"),
    ("data.val_batch_size=0", "data.val_batch_size must be >= 1, got 0"),
    ("data.epoch_samples=0", "data.epoch_samples must be >= 1, got 0"),
])
def test_values_out_of_range_are_refused_with_their_key(override, message):
    from core.errors import UserError
    from launch.config import check_values

    check_values(load_config(RunConfig, None, []))  # the defaults pass
    with pytest.raises(UserError, match=re.escape(message)):
        check_values(load_config(RunConfig, None, [override]))
