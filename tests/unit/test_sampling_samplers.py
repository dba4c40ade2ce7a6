"""Samplers: call accounting, caching, schedule statistics, order laws, oracles, prefixes.

Legend: B sequences, L positions, V vocabulary (including [MASK]).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from megatron_lomdm.diffusion import build_family
from megatron_lomdm.diffusion.lomdm import normsig
from megatron_lomdm.sampling import (
    SAMPLERS,
    DenoiserOutput,
    build_sampler,
    confidence,
    denoiser_from_backbone,
    entropy_bound_select,
    order_kendall_tau,
    sampling_log_probs,
)

V = 7
MASK = V - 1
L = 8


class StubDenoiser:
    """Context-dependent toy denoiser: logits = position term + term of the right neighbour.

    Exponents (optional) = c1 + c2 NormSig(position term + token term): context dependent.
    Records every input and output.
    """

    def __init__(self, seq_length: int = L, *, exponents: bool = True, seed: int = 0,
                 scale: float = 1.5, c1: float = 0.7, c2: float = 0.65) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pos_LV = scale * torch.randn(seq_length, V, generator=g)
        self.tok_VV = scale * torch.randn(V, V, generator=g)
        self.pos_L = torch.randn(seq_length, generator=g)
        self.tok_V = torch.randn(V, generator=g)
        self.exponents, self.c1, self.c2 = exponents, c1, c2
        self.calls = 0
        self.inputs: list[Tensor] = []
        self.outputs: list[DenoiserOutput] = []

    def __call__(self, z_BL: Tensor) -> DenoiserOutput:
        self.calls += 1
        logits_BLV = self.pos_LV + self.tok_VV[z_BL.roll(-1, dims=1)]
        e_BL = None
        if self.exponents:
            e_BL = self.c1 + self.c2 * normsig(self.pos_L + self.tok_V[z_BL])
        out = DenoiserOutput(logits_BLV, e_BL)
        self.inputs.append(z_BL.clone())
        self.outputs.append(out)
        return out


class FixedDenoiser:
    """Position-only logits (independent of z) and optional fixed exponents."""

    def __init__(self, logits_LV: Tensor, exponents_L: Tensor | None = None) -> None:
        self.logits_LV, self.exponents_L = logits_LV, exponents_L
        self.calls = 0

    def __call__(self, z_BL: Tensor) -> DenoiserOutput:
        self.calls += 1
        B = z_BL.shape[0]
        e_BL = None if self.exponents_L is None else self.exponents_L.expand(B, -1)
        return DenoiserOutput(self.logits_LV.expand(B, -1, -1), e_BL)


SAMPLER_OPTS = {
    "ancestral": {"num_steps": 6},
    "exact": {},
    "mdlm_cache": {"num_steps": 6},
    "top_prob": {"num_steps": 4},
    "top_margin": {"num_steps": 4},
    "lomdm_top_margin": {"num_steps": 4},
    "remask": {"num_steps": 6, "checks": 2, "drop": 0.9},
    "entropy_bound": {"gamma": 1.0},
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_registered_sampler_is_tested() -> None:
    assert set(SAMPLERS) == set(SAMPLER_OPTS)
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("nope", mask_id=MASK)
    with pytest.raises(ValueError, match="unknown options"):
        build_sampler("ancestral", mask_id=MASK, num_steps=4, gamma=1.0)


@pytest.mark.parametrize("name", sorted(SAMPLER_OPTS))
def test_sampler_one_call_per_step(name: str) -> None:
    for use_cache in (False, True):
        den = StubDenoiser()
        sampler = build_sampler(name, mask_id=MASK, use_cache=use_cache, **SAMPLER_OPTS[name])
        res = sampler.sample(den, batch_size=3, seq_length=L, generator=gen(1))
        assert res.num_calls == den.calls
        if use_cache:
            assert 1 <= res.num_calls <= res.num_steps
        else:
            assert res.num_calls == res.num_steps  # exactly one call per executed step
        steps_cap = SAMPLER_OPTS[name].get("num_steps", L) + (name == "mdlm_cache")
        assert res.num_steps <= steps_cap
        assert int(res.unmask_step_BL.max()) == res.num_steps - 1
    if name == "exact":
        assert res.num_steps == L


@pytest.mark.parametrize("name", sorted(SAMPLER_OPTS))
def test_sampler_no_mask_left(name: str) -> None:
    for seed in range(3):
        den = StubDenoiser(seed=seed)
        sampler = build_sampler(name, mask_id=MASK, **SAMPLER_OPTS[name])
        res = sampler.sample(den, batch_size=4, seq_length=L, generator=gen(seed))
        assert res.tokens_BL.shape == (4, L)
        assert not bool((res.tokens_BL == MASK).any())
        assert bool((res.unmask_step_BL >= 0).all())


def test_sampler_no_mask_left_with_bf16_logits_and_t_min() -> None:
    def den(z_BL: Tensor) -> DenoiserOutput:
        out = StubDenoiser()(z_BL)
        return DenoiserOutput(out.logits_BLV.bfloat16(), out.velocity_exponents_BL)

    for grid in ({"t_min": 1e-5}, {"kind": "beta", "a": 2.0, "b": 0.5}):
        res = build_sampler("ancestral", mask_id=MASK, num_steps=3, grid=grid).sample(
            den, batch_size=16, seq_length=L, generator=gen(0))
        assert not bool((res.tokens_BL == MASK).any())
    res = build_sampler("mdlm_cache", mask_id=MASK, num_steps=3, noise_removal=False).sample(
        den, batch_size=16, seq_length=L, generator=gen(0))
    assert not bool((res.tokens_BL == MASK).any()) and res.num_steps <= 3


@pytest.mark.parametrize(
    "name, opts",
    [
        ("ancestral", {"num_steps": 40, "exponent": 0.05}),
        ("ancestral", {"num_steps": 40}),  # tiny context-dependent exponents from the stub
        ("mdlm_cache", {"num_steps": 200}),
    ],
)
def test_sampler_cache_skips_unchanged_steps(name: str, opts: dict) -> None:
    stub_kw = {"c1": 0.06, "c2": 0.05} if "exponent" not in opts else {"exponents": False}
    results = {}
    for use_cache in (True, False):
        den = StubDenoiser(seq_length=6, **stub_kw)
        sampler = build_sampler(name, mask_id=MASK, use_cache=use_cache, **opts)
        results[use_cache] = sampler.sample(den, batch_size=2, seq_length=6, generator=gen(3))
    cached, plain = results[True], results[False]
    assert cached.num_calls < cached.num_steps  # steps without a change reused the output
    assert plain.num_calls == plain.num_steps == cached.num_steps
    assert torch.equal(cached.tokens_BL, plain.tokens_BL)
    assert torch.equal(cached.unmask_step_BL, plain.unmask_step_BL)
    # one call per distinct state: at step 0 and after every step that changed a token
    # (the last executed step always does, and needs no further call).
    assert cached.num_calls == torch.unique(cached.unmask_step_BL).numel()


@pytest.mark.parametrize("name", ["ancestral", "mdlm_cache"])
def test_cached_calls_are_occupied_grid_steps(name: str) -> None:
    """Under the linear schedule each position unmasks in a uniform grid step, so the cached calls
    are the occupied bins of L balls in T bins: E = T (1 - (1 - 1/T)^L) ~ T (1 - e^{-L/T})
    (performance.md §A4); 4 standard errors over 60 samples."""
    Lq, T, n = 128, 256, 60
    den = FixedDenoiser(torch.zeros(Lq, V))
    opts = {"exponent": 1.0} if name == "ancestral" else {}
    sampler = build_sampler(name, mask_id=MASK, num_steps=T, **opts)
    calls = [sampler.sample(den, batch_size=1, seq_length=Lq, generator=gen(i)).num_calls for i in range(n)]
    q1, q2 = (1 - 1 / T) ** Lq, (1 - 2 / T) ** Lq
    mean = T * (1 - q1)
    sd = math.sqrt(T * (T - 1) * q2 + T * q1 - T * T * q1 * q1)
    assert abs(mean / (T * (1 - math.exp(-Lq / T))) - 1) < 0.005
    assert abs(sum(calls) / n - mean) < 4 * sd / math.sqrt(n), (sum(calls) / n, mean, sd)
    assert max(calls) < T  # without the cache every one of the T steps would call


def test_exact_sampler_order_law() -> None:
    e_L = torch.tensor([0.05, 0.7, 1.35, 0.9], dtype=torch.float64)
    den = FixedDenoiser(torch.zeros(4, V), e_L)
    n = 20000
    res = build_sampler("exact", mask_id=MASK, num_steps=4).sample(
        den, batch_size=n, seq_length=4, generator=gen(0))
    assert res.num_calls == res.num_steps == 4
    first_N = (res.unmask_step_BL == 0).float().argmax(-1)
    freq = torch.bincount(first_N, minlength=4).double() / n
    expected = e_L / e_L.sum()
    se = torch.sqrt(expected * (1 - expected) / n)
    assert bool(((freq - expected).abs() < 5 * se).all()), (freq, expected)
    # pairwise Plackett-Luce law: P(1 before 0) = e1 / (e1 + e0)
    p10 = float((res.unmask_step_BL[:, 1] < res.unmask_step_BL[:, 0]).double().mean())
    q = float(e_L[1] / (e_L[1] + e_L[0]))
    assert abs(p10 - q) < 5 * math.sqrt(q * (1 - q) / n)
    # event times: decreasing from 1, E[s* at the first event] = S / (S + 1), S = sum e.
    assert bool((res.grid[:, 1:] <= res.grid[:, :-1]).all())
    s_tot = float(e_L.sum())
    assert abs(float(res.grid[:, 1].mean()) - s_tot / (s_tot + 1)) < 0.01
    with pytest.raises(ValueError, match="num_steps"):
        build_sampler("exact", mask_id=MASK, num_steps=3).sample(den, batch_size=1, seq_length=4)


@pytest.mark.parametrize("source", ["exponent", "family", "denoiser"])
def test_ancestral_unmask_counts_match_schedule(source: str) -> None:
    c1, T, B = 0.7, 6, 4000
    opts: dict = {"num_steps": T}
    e_L = None
    if source == "exponent":
        opts["exponent"] = c1
    elif source == "family":
        opts["family"] = build_family("poly", c1=c1, c2=0.0, block_size=1, vocab_size=V,
                                      seq_length=L, mask_id=MASK)
    else:
        e_L = torch.full((L,), c1)  # zero-initialised reverse head: e_R = c1 everywhere
    den = FixedDenoiser(torch.zeros(L, V), e_L)
    res = build_sampler("ancestral", mask_id=MASK, **opts).sample(
        den, batch_size=B, seq_length=L, generator=gen(0))
    steps = res.unmask_step_BL
    grid = res.grid
    n_tot = B * L
    for k in range(T):
        t, s = float(grid[k]), float(grid[k + 1])
        frac = float((steps == k).double().mean())
        expected = t**c1 - s**c1  # method.md §3.8 test 6
        assert abs(frac - expected) < 5 * math.sqrt(expected * (1 - expected) / n_tot) + 1e-12
        n_masked = int((steps >= k).sum())
        stay = float((steps > k).sum()) / n_masked
        q = (s / t) ** c1  # correct stay-masked probability (1 - alpha_s) / (1 - alpha_t)
        se = math.sqrt(max(q * (1 - q), 1e-12) / n_masked)
        assert abs(stay - q) < 5 * se
        buggy = s**c1 / (s**c1 + 1 - q)  # third-party bug: stay weight (1 - alpha_s)
        if 0 < k < T - 1:
            assert abs(stay - buggy) > 5 * se


def test_ancestral_uses_per_position_exponents() -> None:
    """With e_R strongly dependent on position, each masked position unmasks at step k with its
    own 1 - (s/t)^{e_i}, not with a row-wide (e.g. mean) exponent."""
    e_L = torch.tensor([0.05, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0], dtype=torch.float64)
    T, B = 4, 4000
    den = FixedDenoiser(torch.zeros(L, V), e_L)
    res = build_sampler("ancestral", mask_id=MASK, num_steps=T).sample(
        den, batch_size=B, seq_length=L, generator=gen(0))
    steps_BL = res.unmask_step_BL
    for k in range(T - 1):  # the last step fills every remaining mask
        t, s = float(res.grid[k]), float(res.grid[k + 1])
        n_L = (steps_BL >= k).sum(0).double()  # still masked at t
        frac_L = (steps_BL == k).sum(0).double() / n_L
        p_L = 1 - (s / t) ** e_L
        se_L = (p_L * (1 - p_L) / n_L).sqrt()
        assert bool(((frac_L - p_L).abs() < 5 * se_L + 1e-12).all()), (k, frac_L, p_L)


def test_ancestral_needs_exponents_for_learned_families() -> None:
    fam = build_family("lomdm", c1=0.7, c2=0.65, block_size=1, vocab_size=V, seq_length=L,
                       mask_id=MASK)
    sampler = build_sampler("ancestral", mask_id=MASK, num_steps=4, family=fam)
    with pytest.raises(ValueError, match="velocity_exponents_BL"):
        sampler.sample(StubDenoiser(exponents=False), batch_size=1, seq_length=L)
    res = sampler.sample(StubDenoiser(), batch_size=2, seq_length=L, generator=gen(0))
    assert not bool((res.tokens_BL == MASK).any())


def _probs_to_logits(p_LW: list[list[float]]) -> Tensor:
    p = torch.tensor(p_LW, dtype=torch.float64)
    logits = torch.full((p.shape[0], V), -1e9, dtype=torch.float64)
    logits[:, : p.shape[1]] = p.log()
    return logits


# max prob order: 2, 5, 4, 0, 1, 3;  margin order: 2, 4, 5, 1, 0, 3.
KNOWN_P = [
    [0.50, 0.48, 0.01, 0.01],
    [0.40, 0.20, 0.20, 0.20],
    [0.90, 0.05, 0.03, 0.02],
    [0.30, 0.30, 0.20, 0.20],
    [0.60, 0.10, 0.15, 0.15],
    [0.70, 0.28, 0.01, 0.01],
]


@pytest.mark.parametrize(
    "name, expected_steps",
    [("top_prob", [1, 2, 0, 2, 1, 0]), ("top_margin", [2, 1, 0, 2, 0, 1])],
)
def test_top_margin_picks_confident(name: str, expected_steps: list[int]) -> None:
    den = FixedDenoiser(_probs_to_logits(KNOWN_P))
    sampler = build_sampler(name, mask_id=MASK, num_steps=3)  # K = 2 per step
    res = sampler.sample(den, batch_size=3, seq_length=6, generator=gen(0))
    assert torch.equal(res.unmask_step_BL, torch.tensor(expected_steps).expand(3, 6))
    # context-dependent denoiser: at every step the chosen positions are the top-K scores.
    den = StubDenoiser(seq_length=12)
    res = build_sampler(name, mask_id=MASK, num_steps=5).sample(
        den, batch_size=4, seq_length=12, generator=gen(1))
    kind = "max_prob_N" if name == "top_prob" else "margin_N"
    counts = []
    for k, (z_BL, out) in enumerate(zip(den.inputs, den.outputs)):
        for b in range(4):
            masked_L = z_BL[b] == MASK
            chosen_L = res.unmask_step_BL[b] == k
            score_L = getattr(confidence(sampling_log_probs(out.logits_BLV[b], mask_id=MASK)),
                              kind)
            rest_L = masked_L & ~chosen_L
            if rest_L.any():
                assert float(score_L[chosen_L].min()) >= float(score_L[rest_L].max())
        counts.append(int((res.unmask_step_BL == k).sum(-1)[0]))
    assert sum(counts) == 12 and min(counts) >= 1  # sum over steps = L, >= 1 per call


def test_entropy_bound_rule() -> None:
    h = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0]], dtype=torch.float64)
    cand = torch.tensor([[True, True, True, True, False]])
    assert entropy_bound_select(h, cand, 0.35).tolist() == [[True, True, True, False, False]]
    assert entropy_bound_select(h, cand, 0.0).tolist() == [[True, False, False, False, False]]
    assert entropy_bound_select(h, cand, 10.0).tolist() == [[True, True, True, True, False]]
    gamma = 1.5
    den = StubDenoiser(seq_length=16, scale=2.0)
    res = build_sampler("entropy_bound", mask_id=MASK, gamma=gamma).sample(
        den, batch_size=4, seq_length=16, generator=gen(2))
    assert res.num_calls == res.num_steps < 16  # several tokens per call
    for k, (z_BL, out) in enumerate(zip(den.inputs, den.outputs)):
        for b in range(4):
            masked_L = z_BL[b] == MASK
            chosen_L = res.unmask_step_BL[b] == k
            if not masked_L.any():
                continue
            h_L = confidence(sampling_log_probs(out.logits_BLV[b], mask_id=MASK)).entropy_N
            h_chosen = h_L[chosen_L]
            assert h_chosen.numel() >= 1
            assert float(h_chosen.sum() - h_chosen.max()) <= gamma + 1e-12
            rest_L = masked_L & ~chosen_L
            if rest_L.any():  # lowest-entropy prefix, and maximal
                assert float(h_chosen.max()) <= float(h_L[rest_L].min())
                assert float(h_chosen.sum()) > gamma
    one = build_sampler("entropy_bound", mask_id=MASK, gamma=0.0).sample(
        StubDenoiser(), batch_size=2, seq_length=L, generator=gen(0))
    assert one.num_steps == L  # gamma = 0: one token per call
    many = build_sampler("entropy_bound", mask_id=MASK, gamma=1e9).sample(
        StubDenoiser(), batch_size=2, seq_length=L, generator=gen(0))
    assert many.num_steps == 1


@pytest.mark.parametrize("name", sorted(SAMPLER_OPTS))
def test_prefix_conditioning_kept(name: str) -> None:
    g = gen(5)
    B = 4
    prompt_BL = torch.randint(0, MASK, (B, L), generator=g)
    fixed_BL = torch.rand(B, L, generator=g) < 0.4
    fixed_BL[:, :2] = True  # a prefix plus scattered infilling constraints
    den = StubDenoiser()
    res = build_sampler(name, mask_id=MASK, **SAMPLER_OPTS[name]).sample(
        den, prompt_BL=prompt_BL, fixed_BL=fixed_BL, generator=gen(0))
    assert torch.equal(res.tokens_BL[fixed_BL], prompt_BL[fixed_BL])
    assert bool((res.unmask_step_BL[fixed_BL] == -1).all())
    assert bool((res.unmask_step_BL[~fixed_BL] >= 0).all())
    assert not bool((res.tokens_BL == MASK).any())
    assert torch.equal(den.inputs[0], torch.where(fixed_BL, prompt_BL, MASK))
    # default fixed mask: the non-[MASK] prompt tokens
    prompt2 = torch.where(fixed_BL, prompt_BL, MASK)
    res2 = build_sampler(name, mask_id=MASK, **SAMPLER_OPTS[name]).sample(
        StubDenoiser(), prompt_BL=prompt2, generator=gen(0))
    assert torch.equal(res2.tokens_BL, res.tokens_BL)
    with pytest.raises(ValueError, match="MASK"):
        build_sampler(name, mask_id=MASK, **SAMPLER_OPTS[name]).sample(
            den, prompt_BL=prompt2, fixed_BL=torch.ones(B, L, dtype=torch.bool))


def test_arm_block_order() -> None:
    arm = build_family("arm", c1=1.0, c2=0.0, block_size=1, vocab_size=V, seq_length=L,
                       mask_id=MASK)
    den = StubDenoiser(exponents=False)
    res = build_sampler("ancestral", mask_id=MASK, num_steps=L, family=arm).sample(
        den, batch_size=3, seq_length=L, generator=gen(0))
    assert torch.equal(res.unmask_step_BL, torch.arange(L).expand(3, L))
    res = build_sampler("ancestral", mask_id=MASK, num_steps=2 * L, family=arm).sample(
        den, batch_size=3, seq_length=L, generator=gen(0))
    assert bool((res.unmask_step_BL.diff(dim=-1) > 0).all())  # strictly left to right
    assert L <= res.num_calls < 2 * L  # half-slots in which no row changed reuse the cache
    res = build_sampler("ancestral", mask_id=MASK, num_steps=L // 2, family=arm).sample(
        den, batch_size=3, seq_length=L, generator=gen(0))
    assert bool((res.unmask_step_BL.diff(dim=-1) >= 0).all())
    torch.testing.assert_close(order_kendall_tau(res.unmask_step_BL),
                               torch.ones(3, dtype=torch.float64))
    # BD3LM: block by block, any order inside a block.
    bd3 = build_family("bd3lm", c1=1.0, c2=0.0, block_size=4, vocab_size=V, seq_length=L,
                       mask_id=MASK)
    res = build_sampler("ancestral", mask_id=MASK, num_steps=L, family=bd3).sample(
        den, batch_size=16, seq_length=L, generator=gen(0))
    steps = res.unmask_step_BL
    assert bool((steps[:, :4].max(-1).values < steps[:, 4:].min(-1).values).all())
    assert bool((steps[:, :4] < 4).all()) and bool((steps[:, 4:] >= 4).all())
    # ARM with a 3-token prompt prefix: the prefix slots cost no call.
    prompt = torch.full((2, L), MASK)
    prompt[:, :3] = torch.tensor([0, 1, 2])
    den = StubDenoiser(exponents=False)
    res = build_sampler("ancestral", mask_id=MASK, num_steps=L, family=arm).sample(
        den, prompt_BL=prompt, generator=gen(0))
    assert torch.equal(res.unmask_step_BL[0], torch.tensor([-1, -1, -1, 3, 4, 5, 6, 7]))
    assert den.calls == L - 3


def test_temperature_nucleus() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]])  # last column = [MASK]
    logp = sampling_log_probs(logits, mask_id=4, temperature=2.0)
    expected = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64) / 2, 0)
    torch.testing.assert_close(logp[0, :4], expected)
    assert logp.dtype == torch.float64 and logp[0, 4] == -math.inf
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64), 0)  # .64 .24 ..
    nuc = sampling_log_probs(logits, mask_id=4, top_p=0.7).exp()[0]
    torch.testing.assert_close(nuc[:2], p[:2] / p[:2].sum())
    assert bool((nuc[2:] == 0).all())
    assert float(sampling_log_probs(logits, mask_id=4, top_p=1e-6).exp()[0, 0]) == 1.0
    # Monte Carlo through a sampler (one step fills everything).
    n = 20000
    logits_LV = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 0.0, 3.0]])
    for temperature, top_p in [(0.5, 1.0), (1.0, 0.8), (2.0, 0.9)]:
        sampler = build_sampler("ancestral", mask_id=MASK, num_steps=1, exponent=1.0,
                                temperature=temperature, top_p=top_p)
        res = sampler.sample(FixedDenoiser(logits_LV), batch_size=n, seq_length=1,
                             generator=gen(0))
        freq = torch.bincount(res.tokens_BL[:, 0], minlength=V).double() / n
        law = sampling_log_probs(logits_LV, mask_id=MASK, temperature=temperature,
                                 top_p=top_p).exp()[0]
        se = torch.sqrt(law * (1 - law) / n)
        assert bool(((freq - law).abs() <= 5 * se + 1e-12).all()), (freq, law)
        assert bool((freq[law == 0] == 0).all())  # outside the nucleus: never drawn
    with pytest.raises(ValueError):
        build_sampler("ancestral", mask_id=MASK, num_steps=1, temperature=0.0)
    with pytest.raises(ValueError):
        build_sampler("ancestral", mask_id=MASK, num_steps=1, top_p=0.0)


def test_sampler_reproducible_with_generator() -> None:
    for name in sorted(SAMPLER_OPTS):
        runs = [build_sampler(name, mask_id=MASK, **SAMPLER_OPTS[name]).sample(
            StubDenoiser(), batch_size=3, seq_length=L, generator=gen(7)) for _ in range(2)]
        assert torch.equal(runs[0].tokens_BL, runs[1].tokens_BL)
        assert torch.equal(runs[0].unmask_step_BL, runs[1].unmask_step_BL)


class _TinyBackbone(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, dim)
        self.out = nn.Linear(dim, V)

    def forward(self, z_BL: Tensor) -> tuple[Tensor, Tensor]:
        h_BLD = self.emb(z_BL)
        return self.out(h_BLD), h_BLD


def test_denoiser_from_backbone_families() -> None:
    torch.manual_seed(0)
    backbone = _TinyBackbone()
    kw = {"c1": 0.7, "c2": 0.65, "block_size": 1, "vocab_size": V, "seq_length": L,
          "mask_id": MASK}
    lomdm = build_family("lomdm", **kw)
    head = nn.Sequential(nn.Linear(4, 1), nn.Flatten(-2))
    den = denoiser_from_backbone(backbone, family=lomdm, rev_head=head)
    z = torch.full((2, L), MASK)
    z[:, 0] = 1
    out = den(z)
    e = out.velocity_exponents_BL
    assert e.shape == (2, L) and bool(((e > 0.05) & (e < 1.35)).all())
    torch.testing.assert_close(e.mean(-1), torch.full((2,), 0.7))
    res = build_sampler("ancestral", mask_id=MASK, num_steps=4, family=lomdm).sample(
        den, batch_size=2, seq_length=L, generator=gen(0))
    assert not bool((res.tokens_BL == MASK).any())
    with pytest.raises(ValueError, match="rev_head"):
        denoiser_from_backbone(backbone, family=lomdm)
    genmd4 = build_family("genmd4", **kw)
    out = denoiser_from_backbone(backbone, family=genmd4)(z)
    torch.testing.assert_close(out.velocity_exponents_BL, torch.ones(2, L))  # w_v = 1 at init
    mdlm = build_family("mdlm", **kw)
    assert denoiser_from_backbone(backbone, family=mdlm)(z).velocity_exponents_BL is None
