"""The guidance step written once (engines.stepping.guide): plain CFG bitwise as before, guidance_rescale
as diffusers' rescale_noise_cfg, on numpy arrays and on torch tensors (training/sampling.py uses it)."""

import numpy as np
import pytest

from engines.stepping import guide


def _preds(seed, shape=(3, 4, 8, 8)):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape, dtype=np.float32)
    c = (u + rng.standard_normal(shape, dtype=np.float32) * rng.uniform(0.2, 2.0, (shape[0], 1, 1, 1))).astype(np.float32)
    return u, c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_guidance_is_the_textbook_formula_bitwise(seed):
    u, c = _preds(seed)
    g = float(np.random.default_rng(seed).uniform(1.5, 12))
    got = guide(u, c, g)
    assert got.dtype == np.float32
    assert np.array_equal(got, u + np.float32(g) * (c - u))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rescale", [0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(seed, rescale):
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    u, c = _preds(seed)
    g = 7.5
    tu, tc = torch.from_numpy(u), torch.from_numpy(c)
    ref = rescale_noise_cfg(tu + g * (tc - tu), tc, guidance_rescale=rescale).numpy()
    got = guide(u, c, g, rescale)
    got_torch = guide(tu, tc, g, rescale).numpy()
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    np.testing.assert_allclose(got_torch, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
    # not vacuous: the rescale moved the prediction well beyond float32 rounding
    assert np.abs(ref - guide(u, c, g)).max() > 1e-2 * np.abs(ref).max()
    # per sample: std of the fully rescaled prediction = std of the conditional one
    if rescale == 1.0:
        np.testing.assert_allclose(got.reshape(3, -1).std(1, ddof=1), c.reshape(3, -1).std(1, ddof=1), rtol=1e-5)
