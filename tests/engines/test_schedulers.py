"""The numpy schedulers of engines/ against diffusers' own, step by step, within float32's own reach.

Both sides get the same config dict and the same "model": the prediction a perfect denoiser would
make if the data were one fixed image, plus fixed noise. It depends on the current latents, so an
error in one step propagates into the next model call as in a real denoising loop, and it keeps the
latents unit-scale like a trained model does (a model returning pure noise makes DDIM's latents
grow to ~40 and PNDM's to ~500, where float32 rounding alone exceeds 1e-5).

The bound is relative to what float32 can promise on that very trajectory, measured, not tuned on one
CPU: diffusers is run again with one-ulp random perturbations of the starting latents and of every
model output, and how far that moves it (the "noise") sets the tolerance, NOISE_FACTOR x noise. A fixed
1e-5 failed on an Intel Xeon with AVX-512 (PNDM, linear betas, trailing spacing, 7 steps: 1.05e-5)
and passed on other CPUs; `test_report_errors` prints error, noise and margin per case.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

from engines.errors import SchedulerConfigError
from engines.schedulers import make_scheduler, scheduler_name

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: one ulp of 1.0
NOISE_FACTOR = 8  # two independent float32 implementations each stray ~noise from exact; 8x leaves room
FLOOR_ULPS = 16  # trajectories whose float32 noise is below 16 ulps of 1.0 still get 16 ulps (1.9e-6)
JITTERS = (101, 102)  # two one-ulp perturbations estimate the noise (max of the two)
SEEDS = (0, 1, 2, 3)  # the test model's data, noise and starting latents

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


def _trajectory(name, config, steps, seed, *, ours: bool, jitter: int | None = None, shape=(2, 4, 8, 8)):
    """Run one scheduler (diffusers' or ours) on the test model; returns (model inputs, latents) per step.

    `jitter`: seed of a one-ulp random-sign relative perturbation of the starting latents and of every
    model output (diffusers only): how far rounding of that size moves this trajectory is what float32
    itself cannot promise, and sets the tolerance (see `_agreement`)."""
    ref = DIFFUSERS[name].from_config(config)
    ref.set_timesteps(steps)
    sched = make_scheduler(name, config) if ours else ref
    if ours:
        sched.set_timesteps(steps)
        np.testing.assert_allclose(sched.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-4)
        assert abs(sched.init_noise_sigma - float(ref.init_noise_sigma)) <= 1e-5 * max(1.0, sched.init_noise_sigma)
    prediction_type = ref.config.prediction_type
    jrng = None if jitter is None else np.random.default_rng(jitter)

    def ulp(a):
        if jrng is None:
            return a
        return (a * (1 + EPS32 * jrng.choice(np.float32([-1, 1]), size=a.shape))).astype(np.float32)

    rng = np.random.default_rng(seed)
    target = (0.7 * rng.standard_normal(shape)).clip(-1.5, 1.5)
    x0 = rng.standard_normal(shape, dtype=np.float32) * np.float32(float(ref.init_noise_sigma))
    x = x0.copy() if ours else torch.from_numpy(ulp(x0.copy()))
    inputs, latents = [], []
    for i, (t_ref, t) in enumerate(zip(ref.timesteps, sched.timesteps, strict=True)):
        noise = rng.standard_normal(shape)
        a = _alpha_bar(ref, name, i, t_ref)
        x_in = sched.scale_model_input(x, t)
        x_in_np = x_in if ours else x_in.numpy()
        out = _model(x_in_np, a, target, noise, prediction_type)
        x = sched.step(out, t, x) if ours else ref.step(torch.from_numpy(ulp(out)), t, x).prev_sample
        x_np = x if ours else x.numpy()
        assert x_np.dtype == np.float32 and x_np.shape == shape
        inputs.append(np.array(x_in_np, copy=True))
        latents.append(np.array(x_np, copy=True))
    return inputs, latents


def _distance(a_steps, b_steps) -> float:
    """Worst over steps of max |a - b| / max(1, |b|): latents are unit-scale except Euler's early steps,
    which carry sigma (up to ~15 for SD, ~160 for the cosine schedule), where float32 allows no better
    than relative agreement."""
    return max(float(np.abs(a - b).max()) / max(1.0, float(np.abs(b).max()))
               for a, b in zip(a_steps, b_steps, strict=True))


@dataclass
class Agreement:
    error: float  # ours vs diffusers: worst step, relative (see _distance), model inputs and latents
    noise: float  # diffusers vs diffusers with one-ulp jitter: float32's own reach on this trajectory
    calls: int

    @property
    def tol(self) -> float:
        """NOISE_FACTOR x the float32 noise of this very trajectory, never below FLOOR_ULPS ulps of 1.0.
        A fixed absolute bound is not machine-independent: how much rounding a trajectory amplifies
        depends on its coefficients (PNDM with a linear schedule and 'trailing' spacing at 7 steps
        multiplies the latents by ~35 in one step), and which rounding happens depends on the SIMD
        kernels numpy and torch dispatch to on this CPU."""
        return max(NOISE_FACTOR * self.noise, FLOOR_ULPS * EPS32)

    @property
    def margin(self) -> float:
        return self.tol / self.error if self.error > 0 else float("inf")

    def __str__(self) -> str:
        return (f"error {self.error:.2e}, float32 noise {self.noise:.2e}, tol {self.tol:.2e}, "
                f"margin {self.margin:.1f}x")


def _agreement(name, config, steps, seed=0) -> Agreement:
    """Our scheduler against diffusers' on the same model, with the float32 noise of the trajectory."""
    ours_in, ours_x = _trajectory(name, config, steps, seed, ours=True)
    ref_in, ref_x = _trajectory(name, config, steps, seed, ours=False)
    assert float(np.abs(ref_x[-1]).max()) < 10, "the test model should keep the final latents unit-scale"
    error = max(_distance(ours_in, ref_in), _distance(ours_x, ref_x))
    noise = 0.0
    for j in JITTERS:
        jit_in, jit_x = _trajectory(name, config, steps, seed, ours=False, jitter=j)
        noise = max(noise, _distance(jit_in, ref_in), _distance(jit_x, ref_x))
    # a well-conditioned test: if one-ulp jitter moved the reference this far, the bound would say nothing
    assert noise <= 1e-4, f"{name}: the test trajectory amplifies rounding to {noise:.1e}"
    return Agreement(error, noise, len(ours_x))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", ["ddim", "pndm", "euler"])
def test_matches_diffusers_step_by_step(name, config_name, seed):
    config = CONFIGS[config_name]
    for steps in (25, 7):
        ag = _agreement(name, config, steps, seed)
        assert ag.error <= ag.tol, f"{name} {config_name} steps={steps} seed={seed}: {ag}"


@pytest.mark.parametrize("skip_prk", [False, True])
def test_pndm_prk_warmup(skip_prk):
    """The paper's sampler with and without the pseudo Runge-Kutta warm-up; PRK makes extra model calls."""
    config = {**SD1, "skip_prk_steps": skip_prk}
    for seed in SEEDS:
        ag = _agreement("pndm", config, 10, seed)
        assert ag.error <= ag.tol, f"seed {seed}: {ag}"
    assert (ag.calls > 10 + 1) == (not skip_prk)  # PLMS alone makes steps + 1 calls, as in diffusers


@pytest.mark.parametrize("extra", [
    {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"interpolation_type": "log_linear"},
    {"final_sigmas_type": "sigma_min"}, {"timestep_spacing": "leading", "steps_offset": 1},
])
def test_euler_variants(extra):
    for seed in SEEDS:
        ag = _agreement("euler", {**SD1, **extra}, 12, seed)
        assert ag.error <= ag.tol, f"{extra} seed {seed}: {ag}"


def test_euler_zero_terminal_snr():
    """sigma_max = 4096 here: the first step cancels x ~ 4096 n down to ~23 n, so one float32 ulp of
    the starting latents (2.4e-4 |n|) is already 1e-5 of the result (and torch's float32 pow rounds
    sigma_max differently from a correctly rounded sqrt): the jitter measures exactly that."""
    config = {**SD1, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
              "timestep_spacing": "trailing"}
    for seed in SEEDS:
        ag = _agreement("euler", config, 12, seed)
        assert ag.error <= ag.tol, f"seed {seed}: {ag}"


@pytest.mark.parametrize("extra", [{"thresholding": True, "sample_max_value": 2.0},
                                   {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
                                   LINSPACE_SAMPLE])
def test_ddim_variants(extra):
    for seed in SEEDS:
        ag = _agreement("ddim", {**COS, **extra}, 9, seed)
        assert ag.error <= ag.tol, f"{extra} seed {seed}: {ag}"


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler"])
def test_in_memory_diffusers_config_takes_this_classs_defaults(name):
    """`dict(DDPMScheduler.from_config(SD1).config)` (what a training run holds, and what went into
    manifests) lists the keys DDPM filled with its own defaults in `_use_default_values`; diffusers'
    from_config drops them, so Euler built from it uses its own timestep_spacing="linspace", not
    DDPM's "leading". The numpy port reads such a dict the same way."""
    from diffusers import DDPMScheduler

    config = dict(DDPMScheduler.from_config(SD1).config)
    assert config["timestep_spacing"] == "leading" and "timestep_spacing" in config["_use_default_values"]
    ag = _agreement(name, config, 12)
    assert ag.error <= ag.tol, f"{name}: {ag}"
    assert make_scheduler(name, config).config["timestep_spacing"] == DIFFUSERS[name].from_config(
        config).config.timestep_spacing


def test_a_wrong_step_is_caught():
    """The noise-scaled bound still catches a real error: one step's coefficient off by 1e-4 relative."""
    ours_in, ours_x = _trajectory("pndm", LINEAR_TRAILING, 7, 0, ours=True)
    ag = _agreement("pndm", LINEAR_TRAILING, 7, 0)
    ref_in, ref_x = _trajectory("pndm", LINEAR_TRAILING, 7, 0, ours=False)
    wrong = [x * np.float32(1 + 1e-4) if i == 3 else x for i, x in enumerate(ours_x)]
    assert _distance(wrong, ref_x) > ag.tol


def test_betas_bit_identical():
    for config in CONFIGS.values():
        for name in ("ddim", "pndm"):
            ours = make_scheduler(name, config).alphas_cumprod
            ref = DIFFUSERS[name].from_config(config).alphas_cumprod.numpy()
            # torch's linspace rounds some betas one ulp off numpy's; the cumulative product carries
            # that along (measured: <= 2 ulps of each value); 8 ulps of each value, not an absolute 1e-7
            ulps = np.abs(ours.astype(np.float64) - ref) / np.spacing(np.abs(ref).astype(np.float32))
            assert ours.dtype == np.float32 and ulps.max() <= 8, (name, ulps.max())


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


@pytest.mark.parametrize("name", ["ddim", "pndm", "euler"])
@pytest.mark.parametrize("spacing,offset,skip_prk", [("leading", 1, True), ("leading", 1, False), ("leading", 7, True),
                                                     ("trailing", 0, True), ("linspace", 0, False)])
def test_every_step_count_is_refused_or_stays_in_range(name, spacing, offset, skip_prk):
    """Every step count either raises SchedulerConfigError naming the real maximum, or visits only training
    timesteps 0..N-1 (SD's "leading" + steps_offset 1 used to index 1000 of 1000 at steps=1000: an
    IndexError, a 500 in the server)."""
    s = make_scheduler(name, {"num_train_timesteps": 1000, "timestep_spacing": spacing, "steps_offset": offset,
                              "skip_prk_steps": skip_prk})
    most = s.max_inference_steps()
    assert most == (1000 if offset == 0 else 1000 - offset) or (offset == 7 and most < 1000)
    for steps in range(max(1, most - 40), 1001):
        if steps > most:
            with pytest.raises(SchedulerConfigError, match=f"between 1 and {most}, got {steps}"):
                s.set_timesteps(steps)
            continue
        if name == "pndm" and not skip_prk and steps < 4:
            continue
        s.set_timesteps(steps)
        ts = np.asarray(s.timesteps)
        assert ts.min() >= 0 and ts.max() <= 999, (steps, ts.max())


def test_report_errors(capsys):
    """Not a check: prints the measured error, noise and margin per sampler/config/seed (-s to see it)."""
    rows = []
    for cname, config in CONFIGS.items():
        for name in ("ddim", "pndm", "euler"):
            for steps in (25, 7):
                ag = min((_agreement(name, config, steps, seed) for seed in SEEDS), key=lambda a: a.margin)
                rows.append(f"{name:5s} {cname:16s} steps={steps:2d} calls={ag.calls:3d} worst seed: {ag}")
    print("\n" + "\n".join(rows))
    assert rows
