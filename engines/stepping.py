"""The denoising step, written once: classifier-free guidance (with optional rescale) and one scheduler step
for any set of image groups in one UNet call.

An `ImageState` is a group of images that share one scheduler (so one step count and sampler): a chunk of
prompts in `Runtime.generate` (`engines.denoise.denoise` is a loop of `unet_step` over one state), or a
single image in the server's lanes (iteration-level batching: images at different steps, with different
step counts, guidance scales or schedulers share one call, because the UNet takes a timestep per sample).

Per group the UNet sees [uncond x B; cond x B] with guidance_scale > 1 (diffusers' layout), only the B
conditional rows otherwise; the prediction is `guide(u, c, scale, rescale)`. An image is therefore bitwise
the same whether it is denoised alone, in a chunk of prompts or in a server lane, whenever the UNet
graph's output for a sample does not depend on the other samples of its batch (true of onnxruntime on CPU
for the graphs exported here; tests/engines/test_batching.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .conditioning import TextCondition
from .errors import EngineError
from .manifest import UNET_INPUTS, UNET_OUTPUTS
from .request import GenerationParams
from .schedulers import Scheduler
from .backends import Session


def guide(pred_uncond, pred_cond, scale: float, rescale: float = 0.0):
    """Classifier-free guidance `u + scale (c - u)`, then, with `rescale` > 0, diffusers' `rescale_noise_cfg`:
    the guided prediction is mixed with itself rescaled to the conditional prediction's per-sample std
    (unbiased, as torch's `std`). Works on numpy arrays and torch tensors alike ([B, ...], any rank)."""
    pred = pred_uncond + float(scale) * (pred_cond - pred_uncond)
    if rescale > 0:
        shape = (pred.shape[0],) + (1,) * (pred.ndim - 1)
        ratio = (_std(pred_cond) / _std(pred)).reshape(shape)
        pred = float(rescale) * (pred * ratio) + (1 - float(rescale)) * pred
    return pred


def _std(x):
    """Per-sample unbiased standard deviation [B] (numpy or torch)."""
    flat = x.reshape(x.shape[0], -1)
    d = flat - flat.mean(1)[:, None]
    return ((d * d).sum(1) / (flat.shape[1] - 1)) ** 0.5


class ImageState:
    """The denoising state of B images sharing one scheduler.

    Args:
        noise: [B, C, H, W] unscaled initial noise (`engines.denoise.initial_noise`).
        cond: TextCondition (or context [B, L, E]) of the images' prompts; uncond: the unconditional one
            (one row, repeated for the B images).
        scheduler: a fresh scheduler owned by this state.
        params: the request's settings (engines.request.GenerationParams): steps, guidance_scale (<= 1
            disables guidance), guidance_rescale (see `guide`); its seed is the caller's business (`noise`).
    """

    def __init__(self, noise: np.ndarray, cond, uncond, scheduler: Scheduler, params: GenerationParams):
        scheduler.set_timesteps(params.steps)
        self.scheduler = scheduler
        self.params = params
        self.cfg = params.cfg
        self.latents = (noise * scheduler.init_noise_sigma).astype(np.float32)
        self.size = int(self.latents.shape[0])
        cond, uncond = TextCondition.of(cond), TextCondition.of(uncond)
        if len(cond) != self.size:
            raise EngineError(f"{len(cond)} text conditions for {self.size} images")
        self.condition = TextCondition.concat([uncond.repeat(self.size), cond] if self.cfg else [cond])
        self.feeds = self.condition.feeds()  # our own arrays (concat copies), never the caller's
        for v in self.feeds.values():
            v.setflags(write=False)  # the same every step: a GPU session may keep them on the device
        self.index = 0  # steps done

    @property
    def total(self) -> int:
        """UNet calls this state needs."""
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total

    def finite(self) -> bool:
        """Whether the latents are free of NaN/inf."""
        return bool(np.isfinite(self.latents).all())

    @property
    def rows(self) -> int:
        """Samples this state adds to a UNet batch (2B with CFG)."""
        return 2 * self.size if self.cfg else self.size


def unet_step(unet: Session, states: Sequence[ImageState]) -> None:
    """Advance every (unfinished) state by one denoising step with one UNet call, in place.

    Raises EngineError if a state is already finished. A finished state whose latents are not finite
    is the caller's to refuse (`ImageState.finite`, the check `denoise` makes)."""
    if not states:
        return
    samples, timesteps = [], []
    for s in states:
        if s.done:
            raise EngineError("unet_step: an image that finished its steps was stepped again")
        t = s.scheduler.timesteps[s.index]
        x = np.concatenate([s.latents, s.latents]) if s.cfg else s.latents
        x = s.scheduler.scale_model_input(x, t)
        samples.append(x)
        timesteps.append(np.full((x.shape[0],), t, dtype=np.float32))
    if len(states) == 1:
        feeds, sample, timestep = states[0].feeds, samples[0], timesteps[0]
    else:
        feeds = TextCondition.concat([s.condition for s in states]).feeds()
        sample, timestep = np.concatenate(samples), np.concatenate(timesteps)
    out = unet.run({UNET_INPUTS[0]: sample, UNET_INPUTS[1]: timestep, **feeds})[UNET_OUTPUTS[0]]
    row = 0
    for s in states:
        pred = out[row:row + s.rows]
        row += s.rows
        if s.cfg:
            pred = guide(pred[:s.size], pred[s.size:], s.params.guidance_scale, s.params.guidance_rescale)
        s.latents = s.scheduler.step(pred, s.scheduler.timesteps[s.index], s.latents)
        s.index += 1
