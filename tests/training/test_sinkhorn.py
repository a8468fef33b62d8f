"""Sinkhorn-Knopp with equipartition: marginals, agreement with an independent implementation, balance."""

import torch

from training.sinkhorn import assign, sinkhorn


def _swav_reference(scores, eps, iters):
    """SwAV's formulation (K x B orientation, in-place normalisations), written independently."""
    q = torch.exp(scores.double() / eps).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()


def test_matches_independent_swav_implementation():
    g = torch.Generator().manual_seed(1)
    for b, k, iters in ((64, 8, 3), (30, 5, 1), (17, 3, 10)):
        s = torch.rand(b, k, generator=g) * 2 - 1
        ours = sinkhorn(s, epsilon=0.05, iterations=iters)
        ref = _swav_reference(s, 0.05, iters)
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_marginals_rows_one_codes_equal_mass():
    g = torch.Generator().manual_seed(2)
    s = torch.rand(96, 8, generator=g) * 2 - 1
    q = sinkhorn(s, epsilon=0.05, iterations=200)
    assert torch.allclose(q.sum(1), torch.ones(96, dtype=q.dtype), atol=1e-9)
    assert torch.allclose(q.sum(0), torch.full((8,), 96 / 8, dtype=q.dtype), rtol=1e-3)
    # three iterations already balance the columns roughly and the rows exactly
    q3 = sinkhorn(s, epsilon=0.05, iterations=3)
    assert torch.allclose(q3.sum(1), torch.ones(96, dtype=q3.dtype), atol=1e-9)
    assert (q3.sum(0) - 12).abs().max() < 6


def test_equipartition_breaks_a_collapse():
    """Every sample prefers code 0: argmax collapses, optimal transport spreads them over all codes."""
    g = torch.Generator().manual_seed(3)
    b, k = 128, 8
    s = 0.3 * torch.rand(b, k, generator=g)
    s[:, 0] += 0.5
    greedy = assign(s, optimal_transport=False)
    assert (greedy == 0).all()
    ot = assign(s, optimal_transport=True, epsilon=0.05, iterations=3)
    counts = torch.bincount(ot, minlength=k)
    assert counts.max() <= 2 * b / k, counts
    assert (counts > 0).all(), counts


def test_transport_keeps_preferences_when_already_balanced():
    """With a clear, balanced preference structure the plan's argmax is the preferred code."""
    b, k = 64, 4
    want = torch.arange(b) % k
    s = torch.full((b, k), -0.5)
    s[torch.arange(b), want] = 0.9
    assert torch.equal(assign(s, True, 0.05, 3), want)


def test_split_rows_with_sum_reduction_equal_the_whole():
    """The distributed form: per-process rows + summed column marginals == one process with all rows.

    Two 'processes' run in lock-step here; their all-reduce is the sum of both halves' tensors."""
    import threading

    g = torch.Generator().manual_seed(4)
    s = torch.rand(40, 6, generator=g) * 2 - 1
    whole = sinkhorn(s, 0.05, 3)
    halves = [s[:20], s[20:]]
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    results: list = [None, None]

    def make_reduce(r):
        def reduce(t):
            slots[r] = t.clone()
            barrier.wait()
            out = slots[0] + slots[1]
            barrier.wait()
            return out
        return reduce

    def work(r):
        results[r] = sinkhorn(halves[r], 0.05, 3, all_reduce_sum=make_reduce(r))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(results), whole, rtol=1e-12, atol=1e-15)


def test_balancing_bias_turns_argmax_into_the_balanced_assignment():
    from training.sinkhorn import balancing_bias

    g = torch.Generator().manual_seed(5)
    n, k = 800, 8
    s = 0.2 * torch.rand(n, k, generator=g)
    s[:, 3] += 0.15  # a code every prompt prefers a little: plain argmax collapses onto it
    assert torch.bincount(s.argmax(1), minlength=k)[3] > 0.8 * n
    b = balancing_bias(s, epsilon=0.05)
    counts = torch.bincount((s + b).argmax(1), minlength=k)
    assert counts.max() <= 1.25 * n / k and counts.min() >= 0.75 * n / k, counts
    # the offsets generalise: fresh rows from the same distribution are balanced too
    s2 = 0.2 * torch.rand(n, k, generator=g)
    s2[:, 3] += 0.15
    c2 = torch.bincount((s2 + b).argmax(1), minlength=k)
    assert c2.max() <= 1.5 * n / k, c2
