"""Zero-shot editors (CM paper Alg. 4) against closed forms on Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch

from cmexp.diffusion import editing as E
from cmexp.diffusion import gaussian_consistency_fn, karras_sigmas
from cmexp.diffusion.sampling import SeededNoise

SD, EPS, T = 0.5, 0.002, 80.0


def c(t: float) -> float:
    """The exact Gaussian consistency function's gain f(x, t) = c(t) x."""
    return math.sqrt((SD**2 + EPS**2) / (SD**2 + t**2))


def scrambler():
    """A deliberately arbitrary consistency function (for 'known part kept' checks)."""

    def f(x, sigma, class_labels=None):
        return torch.tanh(3 * x.flip(-1) + 0.1 * float(torch.as_tensor(sigma).flatten()[0]))

    return f


# ------------------------------------------------------------------------------ transforms
def test_luma_basis_matches_the_paper_matrix_up_to_column_signs() -> None:
    paper = torch.tensor(
        [[0.4471, -0.8204, 0.3563], [0.8780, 0.4785, 0.0], [0.1705, -0.3129, -0.9343]]
    )
    q = E.orthogonal_basis(E.LUMA_WEIGHTS).float()
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-6)
    # the luma column is fixed; the chroma plane is the same plane (any orthonormal basis of it
    # gives the same edit): compare the projectors onto it
    assert torch.allclose(q[:, 0], paper[:, 0], atol=1e-3)
    assert torch.allclose(q[:, 1:] @ q[:, 1:].T, paper[:, 1:] @ paper[:, 1:].T, atol=2e-3)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patch_transform_is_orthogonal_and_invertible(p: int) -> None:
    t = E.PatchTransform(p)
    assert torch.allclose(t.Q.T @ t.Q, torch.eye(p * p), atol=1e-6)
    x = torch.randn(2, 3, 8, 8)
    coeffs = t.forward(x)
    assert coeffs.shape == (2, 3, p * p, 8 // p, 8 // p)
    assert torch.allclose(t.inverse(coeffs), x, atol=1e-5)
    # orthogonal: norms are kept; coefficient 0 is p x the patch mean
    assert torch.allclose(coeffs.norm(), x.norm(), rtol=1e-5)
    means = torch.nn.functional.avg_pool2d(x, p)
    assert torch.allclose(coeffs[:, :, 0], p * means, atol=1e-5)


def test_color_transform_is_invertible_and_downsample_keeps_patch_means() -> None:
    t = E.ColorTransform()
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.allclose(t.inverse(t.forward(x)), x, atol=1e-6)
    low = E.downsample(x, 2)
    assert torch.allclose(
        torch.nn.functional.avg_pool2d(low, 2), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6
    )
    assert torch.allclose(
        low,
        torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="3-channel"):
        t.forward(torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        E.PatchTransform(3).forward(torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------------------ known part
def test_every_editor_keeps_the_known_part() -> None:
    torch.manual_seed(0)
    f, sig = scrambler(), karras_sigmas(6).tolist()
    y = torch.rand(3, 3, 8, 8) * 2 - 1
    mask = E.center_square_mask(y.shape, 4)
    out = E.inpaint(f, y, mask, sig, EPS)
    assert torch.equal(out[..., ~mask[0, 0].bool()], y[..., ~mask[0, 0].bool()])  # bit-exact
    assert not torch.allclose(out, y)

    ct = E.ColorTransform()
    out = E.colorize(f, y, sig, EPS)
    assert torch.allclose(ct.forward(out)[:, 0], ct.forward(y)[:, 0], atol=1e-5)  # luma kept

    pt = E.PatchTransform(2)
    low = E.downsample(y, 2)
    out = E.superres(f, low, 2, sig, EPS)
    assert torch.allclose(
        pt.forward(out)[:, :, 0], pt.forward(y)[:, :, 0], atol=1e-5
    )  # patch means kept
    assert not torch.allclose(out, low, atol=1e-3)


def test_edit_validates_its_inputs() -> None:
    f, y = scrambler(), torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="descending"):
        E.inpaint(f, y, torch.ones(1, 1, 4, 4), [1.0, 2.0], EPS)
    with pytest.raises(ValueError, match="binary"):
        E.inpaint(f, y, torch.full((1, 1, 4, 4), 0.5), [1.0], EPS)
    with pytest.raises(ValueError, match="mask size"):
        E.center_square_mask((4, 4), 5)


# ------------------------------------------------------------------------------ closed forms
def test_inpainting_with_the_exact_gaussian_model_follows_the_closed_form() -> None:
    """Known and unknown pixels of N(0, sd^2 I) data are independent in any orthonormal basis,
    so with the exact f the generated part evolves as x_1 = c(t_1) t_1 z_1,
    x_n = c(t_n)(x_{n-1} + sqrt(t_n^2 - eps^2) z_n) and the known part stays y."""
    f = gaussian_consistency_fn(SD, EPS)
    sig = [80.0, 5.0, 0.5]
    zs = [torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    it = iter(zs)
    y = torch.rand(2, 1, 6, 6) - 0.5
    mask = E.center_square_mask(y.shape, 2)
    out = E.edit(
        f, y, E.IdentityTransform(), mask, sig, EPS, noise=lambda x: next(it), clip_denoised=False
    )
    x = c(80.0) * 80.0 * zs[0]
    for t, z in zip(sig[1:], zs[1:], strict=True):
        x = c(t) * (x + math.sqrt(t**2 - EPS**2) * z)
    expected = torch.where(mask.bool(), x, y)
    assert torch.allclose(out, expected, atol=1e-5)


def test_edits_sample_the_exact_conditional_distribution_of_gaussian_data() -> None:
    """The exact conditional of the unknown coordinates of N(0, sd^2 I) data given the known ones
    is N(0, sd^2) (plus eps^2: the consistency function maps to sigma = eps), whatever the
    known values: check mean, variance and independence from y for inpainting, colorization
    and super-resolution."""
    f = gaussian_consistency_fn(SD, EPS)
    gen = torch.Generator().manual_seed(1)
    y = (torch.rand(4000, 3, 4, 4, generator=gen) * 2 - 1) * SD
    noise = lambda x: torch.randn(x.shape, generator=gen)  # noqa: E731
    sig = karras_sigmas(10, EPS, T).tolist()
    target = SD**2 + EPS**2
    cases = {
        "inpaint": (E.IdentityTransform(), E.center_square_mask(y.shape, 2)),
        "colorize": (E.ColorTransform(), E.ColorTransform().mask(y)),
        "superres": (E.PatchTransform(2), E.PatchTransform(2).mask(y)),
    }
    for name, (t, mask) in cases.items():
        out = E.edit(f, y, t, mask, sig, EPS, noise=noise, clip_denoised=False)
        coeffs, known = t.forward(out), t.forward(y)
        m = mask.expand_as(coeffs).bool()
        gen_part = coeffs[m]
        assert abs(gen_part.mean()) < 0.02, name
        assert abs(gen_part.var() / target - 1) < 0.03, name
        assert torch.equal(
            coeffs[~m].isclose(known[~m], atol=1e-5), torch.ones_like(known[~m], dtype=torch.bool)
        ), name
        # independent of the known values: correlation of a generated with a known coefficient ~ 0
        a = coeffs[m].reshape(len(y), -1)[:, 0]
        b = known[~m].reshape(len(y), -1)[:, 0]
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert abs(corr) < 0.06, name


def test_denoise_and_interpolate_match_closed_forms() -> None:
    f = gaussian_consistency_fn(SD, EPS)
    x = torch.randn(3, 1, 4, 4)
    assert torch.allclose(E.denoise(f, x, 0.3, clip_denoised=False), c(0.3) * x, atol=1e-6)
    z1, z2 = torch.randn(1, 8, 8), torch.randn(1, 8, 8)
    strip = E.interpolate(
        lambda x, s, cl=None: x / s, z1, z2, num=5, sigma_max=T
    )  # f = identity on z
    assert torch.allclose(strip[0], z1.clamp(-1, 1), atol=1e-5)
    assert torch.allclose(strip[-1], z2.clamp(-1, 1), atol=1e-5)
    # slerp keeps the norm for orthogonal unit vectors, and is linear for parallel ones
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = E.slerp(e1, e2, 0.5)
    assert torch.allclose(mid, torch.tensor([[1.0, 1.0]]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(E.slerp(e1, 2 * e1, 0.5), 1.5 * e1, atol=1e-6)


def test_stroke_edit_starts_from_the_strokes() -> None:
    """With the exact model and t = (5.38, 2.24), the result is c(t2)(c(t1)(s + t1 z1) +
    sqrt(t2^2 - eps^2) z2): the strokes s survive, scaled."""
    f = gaussian_consistency_fn(SD, EPS)
    s = E.coarse_strokes(torch.rand(2, 1, 8, 8) * 2 - 1, 4, 4)
    assert len(torch.unique(s)) <= 4
    zs = iter([torch.zeros_like(s), torch.zeros_like(s)])
    out = E.edit(
        f,
        s,
        E.IdentityTransform(),
        torch.ones(1, 1, 1, 1),
        [5.38, 2.24],
        EPS,
        noise=lambda x: next(zs),
        clip_denoised=False,
        start=s,
    )
    assert torch.allclose(out, c(2.24) * c(5.38) * s, atol=1e-6)
    assert E.stroke(f, s, [5.38, 2.24], EPS).shape == s.shape


def test_editors_are_deterministic_per_seed_whatever_the_batch() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    f = lambda x, s, cl=None: net(x) / (1 + float(torch.as_tensor(s).flatten()[0]))  # noqa: E731
    y = torch.rand(4, 1, 8, 8) * 2 - 1
    mask = E.random_boxes_mask(4, y.shape, seed=3)
    assert torch.equal(mask, E.random_boxes_mask(4, y.shape, seed=3))
    sig = [80.0, 2.0, 0.3]
    with torch.no_grad():
        whole = E.inpaint(f, y, mask, sig, EPS, noise=SeededNoise(range(10, 14)).randn_like)
        parts = torch.cat(
            [
                E.inpaint(
                    f, y[:1], mask[:1], sig, EPS, noise=SeededNoise(range(10, 11)).randn_like
                ),
                E.inpaint(
                    f, y[1:], mask[1:], sig, EPS, noise=SeededNoise(range(11, 14)).randn_like
                ),
            ]
        )
    assert torch.allclose(whole, parts, atol=1e-6)


# ------------------------------------------------------------------------------ tau search
def test_ternary_search_finds_the_papers_two_step_index() -> None:
    """The JAX notebook's recorded CIFAR-10 CD search (FID per grid index of N = 18): 11."""
    from cmexp.diffusion.tau_search import greedy_tau_search, ternary_search

    fid = {5: 3.649, 9: 3.319, 10: 3.051, 11: 2.928, 12: 3.049, 13: 3.277, 14: 3.460}
    curve = lambda j: fid.get(j, 3.0 + 0.12 * abs(j - 11))  # noqa: E731 - unimodal fill-in
    calls: list[int] = []
    best = ternary_search(lambda j: calls.append(j) or curve(j), 1, 16)
    assert best == 11 and len(calls) == len(set(calls)) and len(calls) < 12
    idx, seen = greedy_tau_search(lambda ts: curve(ts[-1]), num_scales=18, num_taus=1)
    assert idx == [11] and all(k[0] == 0 for k in seen)


@pytest.mark.parametrize("target", [1, 2, 7, 15, 16])
def test_ternary_search_on_unimodal_functions_and_greedy_order(target: int) -> None:
    from cmexp.diffusion.tau_search import greedy_tau_search, ternary_search

    assert ternary_search(lambda j: (j - target) ** 2, 1, 16) == target
    assert ternary_search(lambda j: abs(j - target) // 3, 1, 16) in range(
        max(1, target - 2), target + 3
    )  # plateaus
    # two taus: the second is searched after the first, and both stay strictly descending in sigma
    idx, _ = greedy_tau_search(
        lambda ts: sum((j - t) ** 2 for j, t in zip(ts[1:], (6, 12))), 18, 2
    )
    assert idx == [6, 12]
    with pytest.raises(ValueError, match="num_taus"):
        greedy_tau_search(lambda ts: 0.0, 18, 17)
