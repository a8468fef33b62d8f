"""The model-family registry (aptp_export/families.py): the family is decided once, from a real UNet's config
and whether the model has a VAE, and the registry and the export format name the same families."""

import pytest
import torch
from arch_testkit import SD15_LIKE, SDXL_LIKE, TOY, make_unet
from diffusers import UNet2DConditionModel

from aptp_export import ArchSpace
from aptp_export.families import MODEL_FAMILIES, Family, detect_family, get_family, unet_extra_inputs
from aptp_export.onnx_export import UNetGraph
from engines.errors import UserError
from engines.manifest import FAMILIES, UNET_ADDED_INPUTS


def _unet(config):
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def test_registry_and_export_format_name_the_same_families():
    # every entry is a format family and every format family has one
    assert tuple(MODEL_FAMILIES) == FAMILIES
    assert all(get_family(n).name == n for n in FAMILIES)
    assert [n for n in FAMILIES if get_family(n).second_text_encoder] == ["sdxl", "sd3"]
    with pytest.raises(UserError, match="unknown model family"):
        get_family("dit")
    with pytest.raises(ValueError, match="FAMILIES"):
        Family("dit", latent=True)  # an entry the runtime could not read is refused


@pytest.mark.parametrize("config, has_vae, family", [(TOY, False, "pixel"), (SD15_LIKE, True, "sd"),
                                                     (SDXL_LIKE, True, "sdxl")])
def test_detected_from_real_unets(config, has_vae, family):
    unet = _unet(config)
    f = detect_family(unet.config, has_vae=has_vae)
    assert f.name == family and f.latent == has_vae
    assert f.second_text_encoder == f.upcast_vae == (family == "sdxl")
    # the graph's extra inputs come from the same entry: SDXL's text_embeds and time_ids, nothing otherwise
    assert UNetGraph(unet).extra_inputs == f.extra_inputs == (UNET_ADDED_INPUTS if family == "sdxl" else ())
    assert UNetGraph(unet).has_added_cond == (family == "sdxl")
    assert unet_extra_inputs(unet.config) == f.extra_inputs
    dims = f.added_cond_dims(unet.config)
    assert (dims is not None) == (family == "sdxl")
    if dims is not None:
        assert dims == (12, 6)  # SDXL_LIKE: text_embeds 12-d, six time ids
        assert f.added_cond(unet.config, (64, 96)).time_ids() == [64, 96, 0, 0, 64, 96]
    else:
        assert f.added_cond(unet.config, (64, 96)) is None


def test_the_vae_separates_pixel_from_sd_and_experts_keep_their_family():
    sd = _unet(SD15_LIKE)
    assert detect_family(sd.config, has_vae=False).name == "pixel"  # the same UNet without a VAE
    assert detect_family(sd.config, has_vae=True).name == "sd"
    assert detect_family({}, has_vae=False).name == "pixel"  # a module without a config
    # the export decides from its first expert: a physically pruned SDXL UNet is still SDXL
    dense = make_unet(SDXL_LIKE, seed=1)
    space = ArchSpace.from_unet(dense)
    expert = space.materialize(dense, space.sample(generator=torch.Generator().manual_seed(0), keep=0.5))
    assert detect_family(expert.config, has_vae=True).name == "sdxl"


def test_combinations_no_family_has_are_refused():
    sdxl = _unet(SDXL_LIKE)
    with pytest.raises(UserError, match="no model family"):
        detect_family(sdxl.config, has_vae=False)  # a text_time UNet in pixel space
    with pytest.raises(UserError, match="no model family"):
        detect_family({**dict(_unet(SD15_LIKE).config), "addition_embed_type": "text"}, has_vae=True)
    with pytest.raises(UserError, match="unsupported UNet"):
        unet_extra_inputs({"addition_embed_type": "image"})


def test_vae_precision_rule_is_the_family_entrys():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4)
    assert vae.config.force_upcast
    assert MODEL_FAMILIES["sdxl"].vae_precision(vae, "fp16") == "fp32"
    assert MODEL_FAMILIES["sd"].vae_precision(vae, "fp16") == "fp16"
    assert MODEL_FAMILIES["sdxl"].vae_precision(vae, "fp32") == "fp32"


def test_pixart_and_sd3_are_their_own_families():
    """A PixArt transformer with a VAE is "pixart" (its graph reads the caption mask), never "sd"; an SD3
    transformer is "sd3" (pooled projections, three text encoders); neither exists without a VAE."""
    from diffusers import PixArtTransformer2DModel

    px = PixArtTransformer2DModel(sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=4,
                                  in_channels=4, out_channels=8, cross_attention_dim=8, caption_channels=6)
    f = detect_family(px.config, has_vae=True)
    assert f.name == "pixart" and f.backbone == "pixart" and f.text_graph == "single"
    assert UNetGraph(px).extra_inputs == ("encoder_attention_mask",) == f.extra_inputs
    with pytest.raises(UserError, match="no model family"):
        detect_family(px.config, has_vae=False)
    sd3 = detect_family({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 8}, has_vae=True)
    assert sd3.name == "sd3" and sd3.text_graph == "sd3" and sd3.extra_inputs == ("pooled_projections",)
    with pytest.raises(UserError, match="no model family"):
        detect_family({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 8}, has_vae=False)
