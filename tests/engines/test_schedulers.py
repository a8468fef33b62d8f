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
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

from engines.errors import SchedulerConfigError
from engines.schedulers import FlowMatchEulerScheduler, default_sampler, make_scheduler, scheduler_name

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


# -- flow matching (SD3 / Flux): FlowMatchEulerDiscreteScheduler ----------------------------------------
# The schedule is computed the same way on both sides (float32 training sigmas, a float64 numpy schedule
# cast to float32, float32 timesteps = sigmas * N), so sigmas and timesteps are compared for exact
# equality, not to a tolerance. The step is one float32 multiply and one add on both sides.

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
       "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True}
FLOW_STEPS = (1, 4, 28, 50)
MU = 0.83  # a Flux-like mu (calculate_shift(1024) is 0.63, 4096 tokens give 1.15)
FLOW_VARIANTS = {  # name -> (config on top of {"shift": ...}, mu)
    "static": ({}, None),
    "karras": ({"use_karras_sigmas": True}, None),
    "exponential": ({"use_exponential_sigmas": True}, None),
    "shift_terminal": ({"shift_terminal": 0.1}, None),
    "invert_sigmas": ({"invert_sigmas": True}, None),
    "dynamic_exp": ({"use_dynamic_shifting": True}, MU),
    "dynamic_linear": ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.7),
    "dynamic_exp_terminal": ({"use_dynamic_shifting": True, "shift_terminal": 0.02}, MU),
    "dynamic_linear_karras": ({"use_dynamic_shifting": True, "time_shift_type": "linear",
                               "use_karras_sigmas": True}, 1.7),
    "dynamic_exp_exponential": ({"use_dynamic_shifting": True, "use_exponential_sigmas": True}, MU),
}


def _flow_pair(config, steps, mu=None):
    """(ours, diffusers') after set_timesteps(steps, mu=mu) from the same config."""
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = make_scheduler("flow_euler", config)
    ref.set_timesteps(steps, mu=mu)
    ours.set_timesteps(steps, mu=mu)
    return ours, ref


# 1.1, 3.16: not float32 values; float32(1.1) - 1 != float32(1.1 - 1), and diffusers' torch rounds the latter
@pytest.mark.parametrize("shift", [1.0, 3.0, 1.1, 3.16])
@pytest.mark.parametrize("variant", sorted(FLOW_VARIANTS))
def test_flow_euler_schedule_equals_diffusers(variant, shift):
    extra, mu = FLOW_VARIANTS[variant]
    config = {**SD3, "shift": shift, **extra}
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = make_scheduler("flow_euler", config)
    # the training schedule (what set_timesteps starts from): float32 on both sides, bit for bit
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert (ours.sigma_min, ours.sigma_max) == (ref.sigma_min, ref.sigma_max)
    for steps in FLOW_STEPS:
        if extra.get("shift_terminal") and steps == 1:
            continue  # diffusers divides 0 by 0 there (test_flow_euler_config_errors)
        ours, ref = _flow_pair(config, steps, mu)
        assert ref.sigmas.dtype == torch.float32 and ref.timesteps.dtype == torch.float32
        assert ours.sigmas.dtype == np.float32 and ours.timesteps.dtype == np.float32
        assert len(ours.timesteps) == steps and len(ours.sigmas) == steps + 1
        np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy(), err_msg=f"{variant} steps={steps}")
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy(), err_msg=f"{variant} steps={steps}")
        assert ours.sigmas[-1] == (1.0 if extra.get("invert_sigmas") else 0.0)


def test_flow_euler_shift_is_applied_twice_like_diffusers():
    """Pins diffusers' schedule so that a port missing the shift, or shifting only once, fails: the
    static shift is applied to the training sigmas (sigma_min = shift(1/N)) and again to the linspace
    between them, so the last sigma is shift(shift(1/N)), not shift(1/N)."""
    def shift3(s):
        return 3.0 * s / (1 + 2.0 * s)

    ours = make_scheduler("flow_euler", SD3)
    ours.set_timesteps(4)
    s_min = float(np.float32(shift3(np.float32(1 / 1000))))  # float32 training sigma, as diffusers
    expected = shift3(np.linspace(1.0, s_min, 4))
    np.testing.assert_allclose(ours.sigmas[:-1], expected, rtol=1e-6)
    assert abs(ours.sigmas[-2] - shift3(s_min)) < 1e-7 and abs(ours.sigmas[-2] - s_min) > 5e-3
    np.testing.assert_allclose(ours.timesteps, expected * 1000, rtol=1e-6)
    unshifted = make_scheduler("flow_euler", {**SD3, "shift": 1.0})
    unshifted.set_timesteps(4)
    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    ref.set_timesteps(4)
    assert np.abs(unshifted.sigmas - ref.sigmas.numpy()).max() > 0.1


def _flow_loop(sched, steps, mu, seed, shape=(2, 4, 8, 8), *, is_ref, begin=0):
    """Latents after each step on random velocities (the same numpy draws on both sides). diffusers'
    flow scheduler has neither init_noise_sigma nor scale_model_input (SD3's pipeline calls neither):
    ours must give 1.0 and the identity."""
    sched.set_timesteps(steps, mu=mu)
    if begin:
        sched.set_begin_index(begin)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    if not is_ref:
        assert sched.init_noise_sigma == 1.0
    x = torch.from_numpy(x) if is_ref else x
    latents = []
    for t in sched.timesteps[begin:]:
        v = rng.standard_normal(shape, dtype=np.float32)
        if is_ref:
            x = sched.step(torch.from_numpy(v), t, x).prev_sample
            latents.append(x.numpy().copy())
        else:
            x_in = sched.scale_model_input(x, t)
            assert x_in is x  # identity, no copy
            x = sched.step(v, t, x)
            assert x.dtype == np.float32 and x.shape == shape
            latents.append(x.copy())
    return latents


def _flow_error(ours_steps, ref_steps) -> float:
    """Worst over steps of max |ours - diffusers| / max(1, max |diffusers|)."""
    return _distance(ours_steps, ref_steps)


FLOW_LOOP_TOL = 1e-6  # relative (see _flow_error); measured: 0 (bit-identical) on x86-64


@pytest.mark.parametrize("variant", ["static", "karras", "exponential", "shift_terminal", "invert_sigmas",
                                     "dynamic_exp", "dynamic_linear"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_sampling_matches_diffusers(variant, shift):
    extra, mu = FLOW_VARIANTS[variant]
    config = {**SD3, "shift": shift, **extra}
    for steps in FLOW_STEPS:
        if extra.get("shift_terminal") and steps == 1:
            continue
        for seed in (0, 1):
            ours = _flow_loop(make_scheduler("flow_euler", config), steps, mu, seed, is_ref=False)
            ref = _flow_loop(FlowMatchEulerDiscreteScheduler.from_config(config), steps, mu, seed, is_ref=True)
            assert len(ours) == steps
            err = _flow_error(ours, ref)
            assert err <= FLOW_LOOP_TOL, f"{variant} shift={shift} steps={steps} seed={seed}: {err:.2e}"


def test_flow_euler_a_wrong_schedule_is_caught():
    """The loop comparison is not vacuous: without the shift (or with the shift applied once) the
    trajectories of SD3's config part by far more than the tolerance."""
    ref = _flow_loop(FlowMatchEulerDiscreteScheduler.from_config(SD3), 28, None, 0, is_ref=True)
    no_shift = _flow_loop(make_scheduler("flow_euler", {**SD3, "shift": 1.0}), 28, None, 0, is_ref=False)
    assert _flow_error(no_shift, ref) > 1e3 * FLOW_LOOP_TOL

    class ShiftedOnce(FlowMatchEulerScheduler):
        def set_timesteps(self, num_inference_steps, mu=None):
            super().set_timesteps(num_inference_steps, mu)
            unshifted = np.linspace(1.0, 1 / 1000, num_inference_steps)
            self.sigmas[:-1] = self._static_shift(unshifted).astype(np.float32)
            self.timesteps = self.sigmas[:-1] * np.float32(1000)

    once = _flow_loop(ShiftedOnce.from_config(SD3), 28, None, 0, is_ref=False)
    assert _flow_error(once, ref) > 1e2 * FLOW_LOOP_TOL


def test_flow_euler_dynamic_shift_mu_from_image_seq_len():
    """Flux's config: mu from the pipelines' calculate_shift, then a full loop."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ours = make_scheduler("FlowMatchEulerDiscreteScheduler", FLUX)
    for seq_len in (256, 1024, 4096, 6000):
        expected = calculate_shift(seq_len, FLUX["base_image_seq_len"], FLUX["max_image_seq_len"],
                                   FLUX["base_shift"], FLUX["max_shift"])
        assert ours.calculate_shift(seq_len) == expected
    mu = ours.calculate_shift(1024)
    ref_loop = _flow_loop(FlowMatchEulerDiscreteScheduler.from_config(FLUX), 28, mu, 3, is_ref=True)
    ours_loop = _flow_loop(make_scheduler("flow_euler", FLUX), 28, mu, 3, is_ref=False)
    assert _flow_error(ours_loop, ref_loop) <= FLOW_LOOP_TOL
    other = _flow_loop(make_scheduler("flow_euler", FLUX), 28, mu + 0.3, 3, is_ref=False)
    assert _flow_error(other, ref_loop) > 1e3 * FLOW_LOOP_TOL  # mu matters


def test_flow_euler_scale_noise_and_img2img():
    """scale_noise (sigma * noise + (1 - sigma) * x) at per-sample timesteps, and img2img: the schedule
    entered at begin_index, noise scaled there, then the remaining steps, against diffusers."""
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    noise = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    ours, ref = _flow_pair(SD3, 10)
    ts = ours.timesteps[[0, 4, 9]]
    got = ours.scale_noise(x0, ts, noise)
    want = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[[0, 4, 9]], torch.from_numpy(noise)).numpy()
    np.testing.assert_array_equal(got, want)
    sig = ours.sigmas[[0, 4, 9]][:, None, None, None]
    np.testing.assert_allclose(got, sig * noise + (1 - sig) * x0, rtol=1e-6, atol=1e-6)

    # img2img (strength 0.7 of 10 steps): begin at index 3
    ours, ref = _flow_pair(SD3, 10)
    ours.set_begin_index(3)
    ref.set_begin_index(3)
    t0 = ours.timesteps[3:4]
    x = ours.scale_noise(x0, np.repeat(t0, 3), noise)
    xr = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[3:4].repeat(3), torch.from_numpy(noise))
    np.testing.assert_array_equal(x, xr.numpy())
    for t, tr in zip(ours.timesteps[3:], ref.timesteps[3:], strict=True):
        v = rng.standard_normal(x0.shape, dtype=np.float32)
        x = ours.step(v, t, x)
        xr = ref.step(torch.from_numpy(v), tr, xr).prev_sample
        assert _flow_error([x], [xr.numpy()]) <= FLOW_LOOP_TOL
    assert ours.step_index == ref.step_index == 10

    # without set_begin_index the first step finds its index from the timestep, as in diffusers
    ours, ref = _flow_pair(SD3, 10)
    x = ours.step(noise, ours.timesteps[6], x0)
    xr = ref.step(torch.from_numpy(noise), ref.timesteps[6], torch.from_numpy(x0)).prev_sample
    assert ours.step_index == ref.step_index == 7
    assert _flow_error([x], [xr.numpy()]) <= FLOW_LOOP_TOL


def test_flow_euler_make_scheduler_and_interface():
    for name in ("flow_euler", "FlowMatchEulerDiscreteScheduler", "FLOW_EULER"):
        assert scheduler_name(name) == "flow_euler"
        s = make_scheduler(name, SD3)
        assert type(s) is FlowMatchEulerScheduler and s.shift == 3.0
    assert set(s.ignored_keys) == {"_class_name", "_diffusers_version"}
    assert s.init_noise_sigma == 1.0
    s.set_timesteps(28)
    assert s.timesteps.dtype == np.float32 and s.timesteps[0] == 1000.0 and s.timesteps[1] % 1 != 0
    x = np.ones((1, 4, 2, 2), dtype=np.float32)
    assert s.scale_model_input(x, s.timesteps[0]) is x
    # a diffusers in-memory config (with _use_default_values) reads as diffusers reads it
    config = dict(FlowMatchEulerDiscreteScheduler.from_config(SD3).config)
    assert make_scheduler("flow_euler", config).config == make_scheduler("flow_euler", SD3).config


def test_flow_euler_config_errors():
    with pytest.raises(SchedulerConfigError, match="use_beta_sigmas.*scipy"):
        make_scheduler("flow_euler", {"use_beta_sigmas": True})
    with pytest.raises(SchedulerConfigError, match="stochastic_sampling.*not ported"):
        make_scheduler("flow_euler", {**SD3, "stochastic_sampling": True})
    with pytest.raises(SchedulerConfigError, match="use_karras_sigmas and use_exponential_sigmas"):
        make_scheduler("flow_euler", {"use_karras_sigmas": True, "use_exponential_sigmas": True})
    with pytest.raises(SchedulerConfigError, match="time_shift_type.*exponential, linear"):
        make_scheduler("flow_euler", {"time_shift_type": "cosine"})
    with pytest.raises(SchedulerConfigError, match="shift="):
        make_scheduler("flow_euler", {"shift": "3"})
    with pytest.raises(SchedulerConfigError, match="shift_terminal"):
        make_scheduler("flow_euler", {"shift_terminal": 1.0})
    s = make_scheduler("flow_euler", FLUX)
    with pytest.raises(SchedulerConfigError, match="use_dynamic_shifting.*mu"):
        s.set_timesteps(28)  # diffusers: ValueError "`mu` must be passed ..."
    with pytest.raises(SchedulerConfigError, match="mu must be a finite number"):
        s.set_timesteps(28, mu=float("nan"))
    with pytest.raises(SchedulerConfigError, match="steps"):
        s.set_timesteps(0, mu=MU)
    # diffusers gives a NaN sigma for shift_terminal with one step; the port refuses it
    ref = FlowMatchEulerDiscreteScheduler.from_config({**SD3, "shift_terminal": 0.1})
    with np.errstate(invalid="ignore", divide="ignore"):
        ref.set_timesteps(1)
    assert torch.isnan(ref.sigmas[0])
    with pytest.raises(SchedulerConfigError, match="shift_terminal needs at least 2 steps"):
        make_scheduler("flow_euler", {**SD3, "shift_terminal": 0.1}).set_timesteps(1)
    s = make_scheduler("flow_euler", SD3)
    x = np.zeros((1, 4, 2, 2), dtype=np.float32)
    with pytest.raises(SchedulerConfigError, match="set_timesteps"):
        s.step(x, np.float32(1000.0), x)
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="not an integer"):
        s.step(x, 3, x)  # an index, as diffusers refuses it too
    with pytest.raises(ValueError, match="not one of this schedule"):
        s.step(x, np.float32(123.5), x)
    for t in s.timesteps:
        s.step(x, t, x)
    with pytest.raises(RuntimeError, match="more steps"):
        s.step(x, s.timesteps[-1], x)


def test_sampler_family_must_match_the_export():
    """A flow-matching sampler on a DDPM config (or the reverse) would silently produce noise: refused."""
    ddpm = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    with pytest.raises(SchedulerConfigError, match="flow-matching sampler.*choose from ddim, pndm, euler"):
        make_scheduler("flow_euler", ddpm)
    with pytest.raises(SchedulerConfigError, match="DDPM-noise sampler.*choose from flow_euler"):
        make_scheduler("euler", flow)
    with pytest.raises(SchedulerConfigError, match="velocity"):
        make_scheduler("ddim", {"shift": 1.0})  # a flow config without its class name
    assert isinstance(make_scheduler("flow_euler", flow), FlowMatchEulerScheduler)
    assert make_scheduler("ddim", ddpm).name == "ddim"
    # PixArt ships DPM-Solver, whose config has flow-matching key names too: its class decides
    from diffusers import DPMSolverMultistepScheduler

    dpm = dict(DPMSolverMultistepScheduler(beta_schedule="linear").config)
    assert "use_dynamic_shifting" in dpm or "flow_shift" in dpm
    assert make_scheduler("ddim", dpm).name == "ddim"
    assert make_scheduler("ddim", {**dpm, "_class_name": "DPMSolverMultistepScheduler"}).name == "ddim"
    with pytest.raises(SchedulerConfigError, match="flow-matching sampler"):
        make_scheduler("flow_euler", dpm)


def test_make_scheduler_gives_the_exports_mu_to_a_dynamic_flow_sampler():
    """An export's scheduler.mu is the default of set_timesteps (the runtime calls it with the steps alone):
    the schedule is diffusers' with that mu, and without it a dynamic config still refuses to guess."""
    config = {**SD3, "use_dynamic_shifting": True}
    ours = make_scheduler("flow_euler", config, mu=MU)
    ours.set_timesteps(7)
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(7, mu=MU)
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    other = make_scheduler("flow_euler", config, mu=MU + 0.5)
    other.set_timesteps(7)
    assert not np.array_equal(other.sigmas, ours.sigmas)
    with pytest.raises(SchedulerConfigError, match="needs `mu`"):
        make_scheduler("flow_euler", config).set_timesteps(7)
    assert default_sampler(config) == "flow_euler" and default_sampler({"beta_schedule": "linear"}) == "ddim"
