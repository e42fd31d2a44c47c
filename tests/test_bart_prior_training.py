"""Training the prior through train.py's run_training on tiny code shards."""
import csv
import math
import os

import pytest
import torch

from bart_prior import BartPrior
from bart_prior.shards import CodeShardMismatch, check_code_shards
from bart_prior.training import PriorRunConfig, build_prior
from core.errors import ModelFolderError
from launch.config import ConfigError, load_config
from launch.train import run_training

from _bart_prior_helpers import make_tokenizer, write_code_shards, one_thread  # noqa: F401 (autouse)

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/bart_prior/tiny.yaml")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior_train")
    train = write_code_shards(str(root / "codes/train"), 256, seed=0)
    val = write_code_shards(str(root / "codes/val"), 32, seed=1)
    tok = str(root / "tok")
    make_tokenizer(tok)
    return root, [f"data.train={train}", f"data.val={val}", f"tokenizer.path={tok}", f"runs_dir={root}/runs"]


def _metrics(run_root: str) -> list[dict]:
    with open(os.path.join(run_root, "csv", "metrics.csv")) as fh:
        return list(csv.DictReader(fh))


def _tiny_vqgan(folder: str) -> str:
    from vqgan import VQGAN, preset

    factor = preset("tiny").downsample_factor
    VQGAN(preset("tiny", resolution=8 * factor, num_codes=64)).save_pretrained(folder)  # an 8x8 code grid
    return folder


def test_training_reduces_loss_and_exports(setup):
    root, overrides = setup
    vq = _tiny_vqgan(str(root / "vqgan"))
    result = run_training("bart_prior", CONFIG, overrides + [
        "name=fit", "trainer.max_steps=40", "trainer.val_check_interval=20", f"model.vqgan_for_samples={vq}",
        "train.sample_every_n_validations=2", "optim.name=adafactor", "optim.lr=1e-2"])
    rows = _metrics(result.run.root)
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[-1] < val[0] < math.log(64) - 1.0, val  # ln 64: the loss of a uniform guess
    assert train[-1] < train[0] - 0.5, train
    keys = {k for r in rows for k, v in r.items() if v}
    assert {"train/perplexity", "train/token_accuracy", "train/lr", "train/grad_norm",
            "val/perplexity", "val/token_accuracy", "val/caption_gain"} <= keys
    # these codes depend on the caption: it lowers the loss (a reversed sign would fail)
    gain = [float(r["val/caption_gain"]) for r in rows if r.get("val/caption_gain")]
    assert len(gain) == 2 and gain[-1] > 0, gain  # 0.001-0.002 nats per code here: the caption fixes few codes
    images = os.listdir(os.path.join(result.run.root, "images"))
    assert len(images) == 1 and images[0].startswith("val_samples")  # every 2nd validation
    prior = BartPrior.from_pretrained(result.export_dir)
    codes = prior.generate(["a red circle"], num_candidates=2, seed=0)
    assert codes.shape == (1, 2, 64) and int(codes.max()) < 64
    # init_from starts a new run from the export's weights (its tokenizer too when tokenizer.path is empty); a
    # missing folder or another architecture is a one-line error
    for tok in ([], ["tokenizer.path=''"]):
        again = build_prior(load_config(PriorRunConfig, CONFIG, overrides + [f"init_from={result.export_dir}"] + tok))
        assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                      prior.model.state_dict().values()))
    with pytest.raises(ConfigError, match="init_from"):
        build_prior(load_config(PriorRunConfig, CONFIG, overrides + [f"init_from={root}/nope"]))
    with pytest.raises(ModelFolderError, match="init_from .*model.safetensors: tensor '.*' has shape"):
        build_prior(load_config(PriorRunConfig, CONFIG, overrides + [f"init_from={result.export_dir}",
                                                                     "model.ffn_dim=48"]))


def test_mismatched_code_shards_fail_at_start(setup, tmp_path):
    root, overrides = setup
    wrong_grid = write_code_shards(str(tmp_path / "grid"), 16, grid=(4, 4))
    with pytest.raises(CodeShardMismatch, match="grid"):
        run_training("bart_prior", CONFIG, overrides + [f"data.train={wrong_grid}", "name=bad_grid"])
    big_codes = write_code_shards(str(tmp_path / "big"), 16, codebook_size=1024)
    with pytest.raises(CodeShardMismatch, match="codebook_size is 64"):
        check_code_shards(big_codes, 64, [8, 8])
    with open(tmp_path / "big" / "manifest.json", "w") as fh:
        fh.write('{"codebook_size": 1024, "grid": [8, 8]}')
    with pytest.raises(CodeShardMismatch, match="1024-entry codebook"):
        check_code_shards(big_codes, 2048, [8, 8])
    run = root / "runs" / "bad_grid"
    assert not (run / "checkpoints" / "last.ckpt").exists()


def test_encoder_lr_scale_sets_the_text_encoders_rate(setup):
    from bart_prior.training import PriorModule

    _, overrides = setup
    cfg = load_config(PriorRunConfig, CONFIG, overrides + ["optim.lr=2e-3", "optim.encoder_lr_scale=0.25"])
    module = PriorModule(cfg)
    opt = module.configure_optimizers()["optimizer"]
    rate = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert len(rate) == len(named)  # every parameter once
    for name, p in named.items():
        assert rate[id(p)] == pytest.approx(5e-4 if ".encoder." in name else 2e-3), name
        assert (decay[id(p)] > 0) == (p.ndim >= 2 and "embed" not in name), name
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(2e-3)  # train/lr logs the decoder's rate
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        bad = load_config(PriorRunConfig, CONFIG, overrides + ["optim.encoder_lr_scale=0"])
        PriorModule(bad).configure_optimizers()


def test_caption_gain_is_zero_for_an_encoder_that_ignores_its_input(setup):
    """The val/caption_gain diagnostic: a collapsed encoder (the same output for every caption) scores 0."""
    from bart_prior.training import PriorModule

    _, overrides = setup
    module = PriorModule(load_config(PriorRunConfig, CONFIG, overrides)).eval()
    codes = torch.randint(0, 64, (4, 8, 8))
    batch = {"codes": codes, "caption": ["a red circle", "a blue square", "a green triangle", "a yellow circle"]}
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        module.validation_step(batch, 0)
        assert logged["val/caption_gain"] != 0.0  # a fresh encoder's output depends on the caption
        last = module.model.encoder.layers[-1].final_layer_norm
        last.weight.zero_()  # every caption now encodes to the layer norm's bias
        module.validation_step(batch, 0)
    assert logged["val/caption_gain"] == pytest.approx(0.0, abs=1e-6)


def test_lr_schedule_shapes():
    from launch.schedule import lr_factor

    cos = lr_factor(10, 110, "cosine", 0.1)
    lin = lr_factor(10, 110, "linear", 0.0)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    assert lin(60) == pytest.approx(0.5) and lin(200) == pytest.approx(0.0)
    assert lr_factor(10, 110, "constant", 0.1)(100) == 1.0
    torch.manual_seed(0)


@pytest.mark.parametrize("prior_cfg,vqgan_cfg", [("tiny", "tiny"), ("shapes", "shapes")])
def test_shipped_configs_fit_their_vqgan(repo_root, prior_cfg, vqgan_cfg):
    from launch.train import resolve_config

    prior = resolve_config("bart_prior", os.path.join(repo_root, f"configs/bart_prior/{prior_cfg}.yaml"),
                           check_files=False)
    vq = resolve_config("vqgan", os.path.join(repo_root, f"configs/vqgan/{vqgan_cfg}.yaml"), check_files=False).model
    side = vq.resolution // 2 ** (len(vq.ch_mult) - 1)
    assert prior.model.codebook_size == vq.num_codes and list(prior.model.grid) == [side, side]


def test_adafactor_with_fsdp_is_refused_before_anything_is_built(repo_root, tmp_path):
    from launch.train import resolve_config

    overrides = [f"runs_dir={tmp_path}", "optim.name=adafactor", "trainer.strategy=fsdp"]
    with pytest.raises(ConfigError, match="adafactor does not work with trainer.strategy=fsdp"):
        resolve_config("bart_prior", os.path.join(repo_root, "configs/bart_prior/tiny.yaml"), overrides,
                       check_files=False)
    assert not os.listdir(tmp_path)
