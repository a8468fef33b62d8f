"""The numpy schedulers of engines/ against diffusers' own, step by step (max abs error <= 1e-5).

Both sides get the same config dict and the same "model": the prediction a perfect denoiser would
make if the data were one fixed image, plus fixed noise. It depends on the current latents, so an
error in one step propagates into the next model call as in a real denoising loop, and it keeps the
latents unit-scale like a trained model does (a model returning pure noise makes DDIM's latents
grow to ~40 and PNDM's to ~500, where float32 rounding alone exceeds 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

from engines.errors import SchedulerConfigError
from engines.schedulers import make_scheduler, scheduler_name

TOL = 1e-5

SD21 = {  # Stable Diffusion 2.1 (768-v): scaled_linear, v-prediction
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None,
}
SD1 = {  # Stable Diffusion 1.x (PNDMScheduler config): epsilon
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
COS = {  # a DDPM-style config with the cosine schedule and the diffusers defaults otherwise
    "_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True,
}
LINEAR_TRAILING = {"beta_schedule": "linear", "timestep_spacing": "trailing", "prediction_type": "epsilon",
                   "set_alpha_to_one": True}
LINSPACE_SAMPLE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                   "timestep_spacing": "linspace", "prediction_type": "sample", "clip_sample": True}

CONFIGS = {"sd21_v": SD21, "sd1_eps": SD1, "cos_eps": COS, "linear_trailing": LINEAR_TRAILING}
DIFFUSERS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}


def _alpha_bar(ref, name, i, t):
    """alpha-bar of the noise level the reference scheduler is at (step i, timestep t)."""
    if name == "euler":
        sigma = float(ref.sigmas[i])
        return 1.0 / (1.0 + sigma**2)
    return float(ref.alphas_cumprod[int(t)])


def _model(x_in, a, target, noise, prediction_type):
    """What a trained model would predict if the data were the single image `target`, plus a little
    noise: eps / v / x0 consistent with x_in = sqrt(a) x0 + sqrt(1-a) eps. Computed in float64 and
    cast, identically for both sides, so only the schedulers' own arithmetic differs."""
    x = x_in.astype(np.float64)
    a = min(max(a, 1e-12), 1 - 1e-7)
    eps = (x - np.sqrt(a) * target) / np.sqrt(1 - a)
    if prediction_type == "v_prediction":
        out = np.sqrt(a) * eps - np.sqrt(1 - a) * target
    elif prediction_type in ("sample", "original_sample"):
        out = target
    else:
        out = eps
    return (out + 0.05 * noise).astype(np.float32)


def _run_both(name, config, steps, seed=0, shape=(2, 4, 8, 8)):
    """Run diffusers' and our scheduler side by side on the same model.

    Returns (worst error relative to max(1, |latents|) over all steps, abs error of the final
    latents, number of model calls). Latents are unit-scale except Euler's early steps, which carry
    sigma (up to ~15 for SD, ~160 for the cosine schedule): there float32 itself allows no better than
    relative agreement, hence the max(1, |x|) scale."""
    ref = DIFFUSERS[name].from_config(config)
    ours = make_scheduler(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-4)
    assert abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-5 * max(1.0, ours.init_noise_sigma)
    prediction_type = ref.config.prediction_type

    rng = np.random.default_rng(seed)
    target = (0.7 * rng.standard_normal(shape)).clip(-1.5, 1.5)
    x0 = rng.standard_normal(shape, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    x_ref, x_ours = torch.from_numpy(x0.copy()), x0.copy()
    worst = 0.0
    for i, (t_ref, t_ours) in enumerate(zip(ref.timesteps, ours.timesteps, strict=True)):
        noise = rng.standard_normal(shape)
        a = _alpha_bar(ref, name, i, t_ref)
        in_ref = ref.scale_model_input(x_ref, t_ref)
        in_ours = ours.scale_model_input(x_ours, t_ours)
        scale = max(1.0, float(in_ref.abs().max()))
        worst = max(worst, float(np.abs(in_ours - in_ref.numpy()).max()) / scale)
        out_ref = torch.from_numpy(_model(in_ref.numpy(), a, target, noise, prediction_type))
        out_ours = _model(in_ours, a, target, noise, prediction_type)
        x_ref = ref.step(out_ref, t_ref, x_ref).prev_sample
        x_ours = ours.step(out_ours, t_ours, x_ours)
        assert x_ours.dtype == np.float32 and x_ours.shape == shape
        scale = max(1.0, float(x_ref.abs().max()))
        worst = max(worst, float(np.abs(x_ours - x_ref.numpy()).max()) / scale)
    final = float(np.abs(x_ours - x_ref.numpy()).max())
    assert float(x_ref.abs().max()) < 10, "the test model should keep the final latents unit-scale"
    return worst, final, len(ours.timesteps)


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler"])
def test_matches_diffusers_step_by_step(name, config_name):
    config = CONFIGS[config_name]
    if name == "pndm" and config.get("prediction_type") == "sample":
        pytest.skip("diffusers' PNDM has no 'sample' prediction")
    for steps in (25, 7):
        worst, final, _ = _run_both(name, config, steps)
        assert final <= TOL and worst <= TOL, f"{name} {config_name} steps={steps}: {final:.2e} / {worst:.2e}"


@pytest.mark.parametrize("skip_prk", [False, True])
def test_pndm_prk_warmup(skip_prk):
    """The paper's sampler with and without the pseudo Runge-Kutta warm-up; PRK makes extra model calls."""
    config = {**SD1, "skip_prk_steps": skip_prk}
    worst, final, calls = _run_both("pndm", config, 10)
    assert worst <= TOL and final <= TOL
    assert (calls > 10 + 1) == (not skip_prk)  # PLMS alone makes steps + 1 calls, as in diffusers


@pytest.mark.parametrize("extra", [
    {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"interpolation_type": "log_linear"},
    {"final_sigmas_type": "sigma_min"}, {"timestep_spacing": "leading", "steps_offset": 1},
])
def test_euler_variants(extra):
    worst, final, _ = _run_both("euler", {**SD1, **extra}, 12)
    assert worst <= TOL and final <= TOL, f"{extra}: {worst:.2e} {final:.2e}"


def test_euler_zero_terminal_snr():
    """sigma_max = 4096 here: the first step cancels x ~ 4096 n down to ~23 n, so one float32 ulp of
    the starting latents (2.4e-4 |n|) is already 1e-5 of the result (and torch's float32 pow rounds
    sigma_max differently from a correctly rounded sqrt). Final latents still agree to 1e-5."""
    config = {**SD1, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
    worst, final, _ = _run_both("euler", config, 12)
    assert final <= TOL and worst <= 1e-4, f"{worst:.2e} {final:.2e}"


@pytest.mark.parametrize("extra", [{"thresholding": True, "sample_max_value": 2.0},
                                   {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                                   LINSPACE_SAMPLE])
def test_ddim_variants(extra):
    worst, final, _ = _run_both("ddim", {**COS, **extra}, 9)
    assert worst <= TOL and final <= TOL


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler"])
def test_in_memory_diffusers_config_takes_this_classs_defaults(name):
    """`dict(DDPMScheduler.from_config(SD1).config)` (what a training run holds, and what went into
    manifests) lists the keys DDPM filled with its own defaults in `_use_default_values`; diffusers'
    from_config drops them, so Euler built from it uses its own timestep_spacing="linspace", not
    DDPM's "leading". The numpy port reads such a dict the same way."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.from_config(SD1).config)
    assert config["timestep_spacing"] == "leading" and "timestep_spacing" in config["_use_default_values"]
    worst, final, _ = _run_both(name, config, 12)
    assert worst <= TOL and final <= TOL, f"{name}: {worst:.2e} {final:.2e}"
    assert make_scheduler(name, config).config["timestep_spacing"] == DIFFUSERS[name].from_config(
        config).config.timestep_spacing


def test_betas_bit_identical():
    for config in CONFIGS.values():
        for name in ("ddim", "pndm"):
            ours = make_scheduler(name, config).alphas_cumprod
            ref = DIFFUSERS[name].from_config(config).alphas_cumprod.numpy()
            assert np.abs(ours - ref).max() <= 1e-7  # ulp-level: torch's linspace rounds differently


def test_config_errors_name_the_key():
    with pytest.raises(SchedulerConfigError, match="beta_schedule"):
        make_scheduler("ddim", {"beta_schedule": "quadratic"})
    with pytest.raises(SchedulerConfigError, match="prediction_type"):
        make_scheduler("pndm", {"prediction_type": "sample"})
    with pytest.raises(SchedulerConfigError, match="use_beta_sigmas"):
        make_scheduler("euler", {"use_beta_sigmas": True})
    with pytest.raises(SchedulerConfigError, match="num_train_timesteps"):
        make_scheduler("ddim", {"num_train_timesteps": "1000"})
    with pytest.raises(SchedulerConfigError, match="unknown scheduler"):
        scheduler_name("lms")
    s = make_scheduler("DDIMScheduler", SD21)
    assert "skip_prk_steps" in s.ignored_keys and "_class_name" in s.ignored_keys
    with pytest.raises(SchedulerConfigError, match="steps"):
        s.set_timesteps(0)
    with pytest.raises(SchedulerConfigError, match="steps"):
        s.set_timesteps(1001)


def test_report_errors(capsys):
    """Not a check: prints the measured worst error per sampler/config (run with -s to see it)."""
    rows = []
    for cname, config in CONFIGS.items():
        for name in ("ddim", "pndm", "euler"):
            worst, final, calls = _run_both(name, config, 25)
            rows.append(f"{name:5s} {cname:16s} calls={calls:3d} final_abs_err={final:.2e} worst_step_rel={worst:.2e}")
    print("\n" + "\n".join(rows))
    assert rows
