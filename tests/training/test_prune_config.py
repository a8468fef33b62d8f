"""Run configs: packaged files load, unknown keys and impossible values are rejected naming the key."""

import pytest
import yaml

from engines.errors import UserError
from training.config import (
    CONFIG_DIR,
    config_from_dict,
    config_to_yaml,
    diff_configs,
    load_config,
    resolve_config_arg,
)

PACKAGED = ["toy", "demo", "sd21_cc3m_base", "sd21_cc3m_small", "sd21_coco_base", "sd21_coco_small",
            "sd15_cc3m_base", "sd15_cc3m_small", "sd15_coco_base", "sd15_coco_small",
            "sdxl_cc3m_base", "sdxl_cc3m_small", "sdxl_coco_base", "sdxl_coco_small",
            "pixart_cc3m_base", "pixart_cc3m_small", "pixart_coco_base", "pixart_coco_small",
            "sd3_cc3m_base", "sd3_cc3m_small", "sd3_coco_base", "sd3_coco_small"]


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_configs_load_and_list_every_key(name):
    path = resolve_config_arg(name)
    cfg = load_config(path)
    # every key is spelled out in the shipped file (nothing silently defaulted)
    assert yaml.safe_load(path.read_text()) == cfg.to_dict()
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_paper_settings():
    got = {n: (load_config(resolve_config_arg(n)).prune.budget, load_config(resolve_config_arg(n)).router.num_experts)
           for n in PACKAGED[2:]}
    paper = {"cc3m_base": (0.85, 16), "cc3m_small": (0.66, 8), "coco_base": (0.78, 8), "coco_small": (0.64, 8)}
    assert got == {f"{m}_{k}": v for m in ("sd21", "sd15", "sdxl", "pixart", "sd3") for k, v in paper.items()}
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(PACKAGED)


@pytest.mark.parametrize("dataset", ["cc3m", "coco"])
@pytest.mark.parametrize("size", ["base", "small"])
def test_sd15_configs_are_the_sd21_recipe_on_sd15(dataset, size):
    """SD 1.5 configs differ from their SD 2.1 twins only in name and model path (prediction type, text
    length and everything else come from the model directory or stay the paper's)."""
    sd15 = load_config(resolve_config_arg(f"sd15_{dataset}_{size}"))
    sd21 = load_config(resolve_config_arg(f"sd21_{dataset}_{size}"))
    assert diff_configs(sd15, sd21) == ["name", "model.path"]
    assert sd15.model.resolution == 256 and sd15.model.prediction_type is None
    assert sd15.model.text_max_length is None and "v1-5" in sd15.model.path


@pytest.mark.parametrize("dataset", ["cc3m", "coco"])
@pytest.mark.parametrize("size", ["base", "small"])
def test_sdxl_configs_are_the_sd21_recipe_on_sdxl_at_512(dataset, size):
    sdxl = load_config(resolve_config_arg(f"sdxl_{dataset}_{size}"))
    sd21 = load_config(resolve_config_arg(f"sd21_{dataset}_{size}"))
    assert diff_configs(sdxl, sd21) == ["name", "model.path", "model.resolution"]
    assert sdxl.model.resolution == 512 and "stable-diffusion-xl-base" in sdxl.model.path


@pytest.mark.parametrize("dataset", ["cc3m", "coco"])
@pytest.mark.parametrize("size", ["base", "small"])
def test_dit_configs_are_the_sd21_recipe_at_512(dataset, size):
    sd21 = load_config(resolve_config_arg(f"sd21_{dataset}_{size}"))
    for name, path in (("pixart", "PixArt-Sigma"), ("sd3", "stable-diffusion-3-medium")):
        dit = load_config(resolve_config_arg(f"{name}_{dataset}_{size}"))
        sd3 = ["model.timestep_sampling"] if name == "sd3" else []  # SD3's logit-normal t
        assert diff_configs(dit, sd21) == ["name", "model.path", "model.resolution", *sd3]
        assert dit.model.resolution == 512 and path in dit.model.path and dit.model.text_max_length is None


@pytest.mark.parametrize("override,message", [
    ("prune.budget=0", "prune.budget must be in (0, 1]"),
    ("prune.budget=1.01", "prune.budget must be in (0, 1]"),
    ("prune.budget=-0.5", "prune.budget must be in (0, 1]"),
    ("router.num_experts=0", "router.num_experts must be >= 1"),
    ("router.num_experts=2.5", "router.num_experts must be int"),
    ("router.gumbel_tau=0", "router.gumbel_tau must be > 0"),
    ("prune.warmup_steps=5000", "prune.warmup_steps must be in [0, steps="),
    ("prune.losses.contrastive=-1", "prune.losses.contrastive must be >= 0"),
    ("prune.losses.resource_type=l2", "prune.losses.resource_type must be log|abs|square"),
    ("prune.optimiser=sgd", "unknown config key 'prune.optimiser'"),
    ("router.optimal_transport=maybe", "router.optimal_transport must be bool"),
    ("data.type=imagefolder", "data.path is required"),
    ("finetune.allocation=all", "finetune.allocation must be per_expert|split"),
    ("finetune.caption_dropout=1", "finetune.caption_dropout must be in [0, 1)"),
    ("name=a/b", "name must be a plain directory name"),
    ("model.timestep_sampling=lognormal", "model.timestep_sampling must be uniform or logit_normal"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(overrides=[override])
    assert message in str(e.value)


def test_yaml_errors_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("prune: 3\n")
    with pytest.raises(UserError, match="prune must be a mapping"):
        load_config(bad)
    with pytest.raises(UserError, match="no packaged config 'nonesuch'"):
        resolve_config_arg("nonesuch")


def test_overrides_and_diff():
    a = load_config()
    b = load_config(overrides=["prune.budget=0.75", "router.optimal_transport=false", "prune.losses.snr_gamma=null"])
    assert b.prune.budget == 0.75 and b.router.optimal_transport is False and b.prune.losses.snr_gamma is None
    assert isinstance(load_config(overrides=["prune.lr=1"]).prune.lr, float)  # int accepted for a float
    # YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it means
    assert load_config(overrides=["finetune.lr=1e-3"]).finetune.lr == 1e-3
    assert load_config(overrides=["prune.unet_lr=5E-5"]).prune.unet_lr == 5e-5
    with pytest.raises(UserError, match="finetune.lr must be float"):
        load_config(overrides=["finetune.lr=1e-3x"])
    assert sorted(diff_configs(a, b)) == ["prune.budget", "prune.losses.snr_gamma", "router.optimal_transport"]
