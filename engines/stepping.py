"""Step-wise denoising of independent images: each image carries its own scheduler and step index,
and one UNet call advances any set of them by one step (iteration-level batching).

The arithmetic is `engines.denoise.denoise`'s, image by image: the same initial noise
(`initial_noise([seed])`), the same CFG layout per image (an unconditional and a conditional row
with guidance_scale > 1, only the conditional row otherwise), the same `u + g (c - u)` and the same
scheduler calls. The UNet takes a timestep per sample, so images at different steps, with different
step counts, guidance scales or schedulers share one call. An image is therefore bitwise the image
`Runtime.generate` gives for its prompt, seed and settings whenever the UNet graph's output for a
sample does not depend on the other samples of its batch (true of onnxruntime on CPU for the graphs
exported here; tests/engines/test_batching.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .denoise import TextCondition, initial_noise
from .errors import EngineError
from .manifest import UNET_INPUTS, UNET_OUTPUTS
from .schedulers import Scheduler
from .sessions import Session


class ImageState:
    """The denoising state of one image.

    Args:
        seed: the image's seed (noise from `np.random.default_rng(seed)`).
        shape: (C, H, W) of the UNet sample.
        cond: TextCondition (or context [1, L, E]) of the prompt; uncond: the unconditional one.
        scheduler: a fresh scheduler owned by this image.
        steps: inference steps; guidance_scale: CFG weight (<= 1 disables guidance).
    """

    def __init__(self, seed: int, shape: tuple[int, int, int], cond, uncond,
                 scheduler: Scheduler, steps: int, guidance_scale: float):
        scheduler.set_timesteps(steps)
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.cfg = self.guidance_scale > 1.0
        self.latents = (initial_noise([seed], shape) * scheduler.init_noise_sigma).astype(np.float32)
        cond, uncond = TextCondition.of(cond), TextCondition.of(uncond)
        self.condition = TextCondition.concat([uncond, cond] if self.cfg else [cond])
        self.index = 0  # steps done

    @property
    def total(self) -> int:
        """UNet calls this image needs."""
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total

    def finite(self) -> bool:
        """Whether the latents are free of NaN/inf."""
        return bool(np.isfinite(self.latents).all())

    @property
    def rows(self) -> int:
        """Samples this image adds to a UNet batch (2 with CFG)."""
        return 2 if self.cfg else 1


def unet_step(unet: Session, states: Sequence[ImageState]) -> None:
    """Advance every (unfinished) state by one denoising step with one UNet call, in place.

    Raises EngineError if a state is already finished. A finished image whose latents are not finite
    is the caller's to refuse (`ImageState.finite`, the check `denoise` makes)."""
    if not states:
        return
    samples, timesteps, conditions = [], [], []
    for s in states:
        if s.done:
            raise EngineError("unet_step: an image that finished its steps was stepped again")
        t = s.scheduler.timesteps[s.index]
        x = np.concatenate([s.latents, s.latents]) if s.cfg else s.latents
        x = s.scheduler.scale_model_input(x, t)
        samples.append(x)
        timesteps.append(np.full((x.shape[0],), t, dtype=np.float32))
        conditions.append(s.condition)
    out = unet.run({UNET_INPUTS[0]: np.concatenate(samples), UNET_INPUTS[1]: np.concatenate(timesteps),
                    **TextCondition.concat(conditions).feeds()})[UNET_OUTPUTS[0]]
    row = 0
    for s in states:
        pred = out[row:row + s.rows]
        row += s.rows
        if s.cfg:
            pred_uncond, pred_cond = pred[:1], pred[1:]
            pred = pred_uncond + np.float32(s.guidance_scale) * (pred_cond - pred_uncond)
        s.latents = s.scheduler.step(pred, s.scheduler.timesteps[s.index], s.latents)
        s.index += 1
