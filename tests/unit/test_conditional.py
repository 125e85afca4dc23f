"""Class-conditional training and classifier-free guidance: closed forms.

* The guided denoiser ``D_u + w (D_c - D_u)`` on a labelled Gaussian mixture, against the
  mixture's posterior means written out here.
* Guided CD's teacher step (Euler) against its closed form with the exact per-class denoiser,
  and guided CD at w = 1 equal to plain conditional CD (same loss, same gradient).
* The w embedding starts at zero: a guided student initialised from its teacher computes the
  teacher for every w; SongUNet, TinyUNet and ADMUNet.
* Label dropout, seeded labels, the NFE of guided sampling, and the inference checks.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cmexp.diffusion.guidance import (
    GuidanceRange,
    GuidedDenoiser,
    ScaleConditioned,
    drop_labels,
    seeded_labels,
)
from cmexp.diffusion.precond import CMPrecond, ConditionalMixtureDenoiser, EDMPrecond
from cmexp.diffusion.solvers import euler_step, heun_step
from cmexp.inference.conditional import (
    check_class_labels,
    check_guidance,
    conditioned_model,
    sample_labels,
)
from cmexp.inference.plan import SamplingSpec, nfe
from cmexp.methods.consistency.loss import ConsistencyDistillationLoss
from cmexp.losses.distances import L2Distance
from cmexp.training.teacher import load_teacher_weights
from cmexp.nets import ADMUNet, SongUNet, TinyUNet

K, D, STD = 3, 4, 0.3


def mixture() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(K, D, generator=gen, dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    return means, weights


def posterior_means(
    x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed forms written out per sample: E[x0 | x, class] and E[x0 | x] of the mixture."""
    means, weights = mixture()
    cond, uncond = torch.empty_like(x), torch.empty_like(x)
    for i in range(x.shape[0]):
        v = STD**2 + float(sigma[i]) ** 2
        post = [means[k] + STD**2 / v * (x[i] - means[k]) for k in range(K)]
        cond[i] = post[int(labels[i])]
        logp = [
            math.log(weights[k]) - 0.5 * float(((x[i] - means[k]) ** 2).sum()) / v
            for k in range(K)
        ]
        top = max(logp)
        r = [math.exp(p - top) for p in logp]
        uncond[i] = sum(r[k] / sum(r) * post[k] for k in range(K))
    return cond, uncond


def test_guided_denoiser_matches_the_mixture_closed_form() -> None:
    means, weights = mixture()
    teacher = ConditionalMixtureDenoiser(means, weights, STD)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, D, generator=gen, dtype=torch.float64) * 2
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.3, 4.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.tensor([0.0, 1.0, 2.0, 3.5, 1.5, 7.0], dtype=torch.float64)
    cond, uncond = posterior_means(x, sigma, labels)
    got = GuidedDenoiser(teacher, w)(x, sigma, labels)
    torch.testing.assert_close(got, uncond + w[:, None] * (cond - uncond))
    torch.testing.assert_close(
        GuidedDenoiser(teacher, 1.0)(x, sigma, labels), cond
    )  # w = 1: conditional
    torch.testing.assert_close(
        GuidedDenoiser(teacher, 0.0)(x, sigma, labels), uncond
    )  # w = 0: null label
    with pytest.raises(ValueError, match="label_dim >= 1"):
        GuidedDenoiser(lambda x, s, c=None: x, 2.0)


class Recorder(torch.nn.Module):
    """A consistency function that records its inputs and returns ``scale * x`` (a parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.9, dtype=torch.float64))
        self.calls: list[dict] = []

    def forward(self, x, sigma, class_labels=None, guidance=None):
        self.calls.append(
            {"x": x.detach().clone(), "sigma": sigma, "labels": class_labels, "guidance": guidance}
        )
        return self.scale * x


@pytest.mark.parametrize("solver", [euler_step, heun_step])
def test_guided_cd_teacher_step_matches_its_closed_form(solver) -> None:
    """x_hat = one ODE step of the guided mixture denoiser, with the w each sample drew."""
    means, weights = mixture()
    loss = ConsistencyDistillationLoss(
        L2Distance(),
        solver,
        ConditionalMixtureDenoiser(means, weights, STD),
        guidance=GuidanceRange(0.0, 5.0, 2.0),
    )
    online, target = Recorder(), Recorder()
    images = means[torch.tensor([0, 1, 2, 0, 1])].clone()
    labels = torch.tensor([0, 1, 2, 0, 1])
    sigmas = torch.tensor([2.0, 1.0, 0.5, 0.2], dtype=torch.float64)
    torch.manual_seed(3)
    out = loss(online, target, images, sigmas, labels)
    x_t, x_hat = online.calls[0]["x"], target.calls[0]["x"]
    w = out.guidance.double()
    assert torch.equal(online.calls[0]["guidance"], out.guidance) and torch.equal(
        target.calls[0]["guidance"], out.guidance
    )
    assert bool((w >= 0).all() and (w <= 5).all()) and w.std() > 0  # drawn per sample

    def d_w(x, s):
        cond, uncond = posterior_means(x, s, labels)
        return uncond + w[:, None] * (cond - uncond)

    s, s_next = out.sigma.double(), out.sigma_next.double()
    slope = (x_t - d_w(x_t, s)) / s[:, None]
    expected = x_t + (s_next - s)[:, None] * slope
    if solver is heun_step:
        slope_next = (expected - d_w(expected, s_next)) / s_next[:, None]
        expected = x_t + (s_next - s)[:, None] * (slope + slope_next) / 2
    torch.testing.assert_close(x_hat, expected)


def tiny(label_dim: int = 3, guidance_embed: bool = False, seed: int = 0) -> TinyUNet:
    torch.manual_seed(seed)
    return TinyUNet(8, 1, label_dim=label_dim, model_channels=8, guidance_embed=guidance_embed)


def test_guided_cd_at_w_one_equals_plain_conditional_cd() -> None:
    """Same teacher, same student weights: the guided objective with w = 1 gives the loss and
    gradient of plain conditional CD (the w input starts at zero, D_1 = D_cond)."""
    teacher = EDMPrecond(tiny(seed=1)).requires_grad_(False)
    plain_net, guided_net = tiny(seed=2), tiny(guidance_embed=True, seed=5)
    load_teacher_weights(guided_net, plain_net)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sigmas = torch.tensor([80.0, 5.0, 1.0, 0.2, 0.002])
    results = []
    for net, guidance in ((plain_net, None), (guided_net, GuidanceRange(1.0, 1.0, 1.0))):
        model = CMPrecond(net)
        target = CMPrecond(net)
        loss = ConsistencyDistillationLoss(L2Distance(), heun_step, teacher, guidance=guidance)
        torch.manual_seed(7)
        value = loss(model, target, images, sigmas, labels).loss.mean()
        value.backward()
        results.append((value.detach(), net.conv_out.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: tiny(guidance_embed=g, seed=0),
        lambda g: (
            torch.manual_seed(0),
            SongUNet(
                8,
                1,
                label_dim=3,
                model_channels=8,
                channel_mult=(1, 2),
                num_blocks=1,
                attn_resolutions=(4,),
                init_scale=1.0,
                guidance_embed=g,
            ),
        )[1],
        lambda g: (
            torch.manual_seed(0),
            ADMUNet(
                8,
                1,
                label_dim=3,
                model_channels=8,
                channel_mult=(1, 2),
                num_blocks=1,
                attn_resolutions=(4,),
                num_head_channels=8,
                guidance_embed=g,
            ),
        )[1],
    ],
    ids=["tiny", "songunet", "adm"],
)
def test_w_embedding_starts_at_zero_and_then_conditions(make) -> None:
    teacher, student = make(False), make(True)
    with torch.no_grad():  # zero-initialised output layers would hide everything
        for p in teacher.parameters():
            p.normal_(0, 0.2)
    load_teacher_weights(student, teacher)
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([0.3, -0.5]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = teacher(x, t, c)
        for w in (0.0, 1.0, torch.tensor([2.0, 7.5])):
            torch.testing.assert_close(student(x, t, c, guidance=w), ref)
        torch.nn.init.normal_(student.guidance_embed.proj.weight)
        assert not torch.allclose(student(x, t, c, guidance=1.0), student(x, t, c, guidance=4.0))
    with pytest.raises(ValueError, match="net.guidance_embed=false"):
        teacher(x, t, c, guidance=2.0)


def test_label_dropout_and_seeded_labels() -> None:
    labels = torch.arange(10) % 3
    keep = torch.linspace(0, 0.99, 10)
    dropped = drop_labels(labels, 0.25, 3, keep)
    assert dropped.tolist() == [3, 3, 3, *labels[3:].tolist()]  # keep < 0.25 -> null label 3
    assert torch.equal(drop_labels(labels, 0.0, 3, keep), labels)
    with pytest.raises(ValueError, match="model.label_dropout"):
        drop_labels(labels, 1.0, 3, keep)
    a = seeded_labels(range(100, 120), 10)
    assert torch.equal(
        torch.cat([seeded_labels(range(100, 107), 10), seeded_labels(range(107, 120), 10)]), a
    )
    assert len(set(a.tolist())) > 3 and a.max() < 10


def _loaded(label_dim: int, consistency: bool, guidance: dict | None = None):
    model = SimpleNamespace(label_dim=label_dim)
    family = "consistency" if consistency else "denoiser"
    return SimpleNamespace(
        label_dim=label_dim,
        spec=SamplingSpec(family=family),
        kind="cd" if consistency else "edm",
        meta={"guidance": guidance} if guidance else {},
        model=model,
        source="x.ckpt",
    )


def test_inference_labels_guidance_and_nfe() -> None:
    cond_edm, uncond = _loaded(10, False), _loaded(0, False)
    guided = _loaded(10, True, {"w_min": 1.0, "w_max": 4.0, "sample": 2.0})
    assert sample_labels(uncond, range(4)) is None
    assert sample_labels(cond_edm, range(2, 7), [3, 7], offset=2).tolist() == [3, 7, 3, 7, 3]
    assert torch.equal(sample_labels(cond_edm, range(5, 9)), seeded_labels(range(5, 9), 10))
    with pytest.raises(ValueError, match="class_labels entry 10 is out of range"):
        check_class_labels(cond_edm, [3, 10])
    with pytest.raises(ValueError, match="is unconditional"):
        check_class_labels(uncond, [1])
    with pytest.raises(ValueError, match="guidance=2.0 needs a class-conditional model"):
        check_guidance(uncond, 2.0)
    with pytest.raises(ValueError, match="distilled without guidance"):
        check_guidance(_loaded(10, True), 2.0)
    with pytest.raises(
        ValueError, match=r"outside the range the student was distilled for \[1.0, 4.0\]"
    ):
        check_guidance(guided, 6.0)
    assert check_guidance(guided, None) == 2.0 and check_guidance(cond_edm, None) is None
    assert isinstance(conditioned_model(guided, 3.0)[0], ScaleConditioned)
    model, passes = conditioned_model(cond_edm, 3.0)
    assert isinstance(model, GuidedDenoiser) and passes == 2
    assert conditioned_model(cond_edm, 1.0)[1] == 1
    grid = [80.0, *torch.linspace(40, 0.002, 17).tolist(), 0.0]
    assert (
        nfe(grid, "heun") == 35
        and nfe(grid, "heun", passes) == 70
        and nfe([80.0], "consistency", 1) == 1
    )


def test_class_accuracy_is_the_fraction_of_argmax_hits() -> None:
    """Hand values (the integration test's tiny student scores 0, where any label order agrees)."""
    from cmexp.metrics.classes import class_accuracy

    logits = torch.tensor([[5.0, 0, 0], [0, 0, 1], [0, 2, 1], [0, 3, 0]])  # argmax 0, 2, 1, 1
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 2])) == 0.5
    assert class_accuracy(logits, torch.tensor([0, 2, 1, 1])) == 1.0
    with pytest.raises(ValueError, match=r"^4 logits but 3 labels$"):
        class_accuracy(logits, torch.tensor([0, 1, 2]))
