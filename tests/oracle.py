"""A naive float64 oracle for the element-wise optimizers, written from their equations.

Each function takes one parameter ``mu`` and its mean gradient ``g`` (float64 tensors), a plain
dict ``state`` that it fills on first use, and the hyperparameters under their public names, and
returns the new parameter. The math follows the equations line by line, in the paper's symbols,
with every scalar computed the obvious way in Python floats. It deliberately does *not* import
``hf_rootfree``: in particular AdaX is the ORIGINAL unnormalized AdaX-W (v grows without bound,
c_t = (1 + β2)^t − 1), so comparing against it proves that the package's normalized form
v̂ = v / c_t is the same method.

State keys here are the symbols of the equations (``m``, ``s``, ``v``, ``b``) plus the integer step
``t``; the tests map them onto the package's state keys.
"""

from __future__ import annotations

import torch


def _float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64).clone()


def _adaptive_denominator(s_hat, g, n, *, lam, rho, lr_units, B, gain=1.0):
    """The root-free denominator d with the per-tensor damping and the lr units.

    λ_l = λ + ρ·B·ḡ² with ḡ = mean(|g|) over this tensor; d = ŝ + λ_l. In AdamW units the step
    n/d is grafted onto AdamW's: d = (ŝ + λ_l)/r with r = gain·‖n/(sqrt(ŝ/B) + ε)‖/‖n/(ŝ + λ_l)‖,
    ε = 1e-8, n the step's numerator (m, or g for the heavy ball).
    """
    g_bar = g.abs().mean().item() if g.numel() else 0.0
    lam_l = max(lam + rho * B * g_bar**2, torch.finfo(torch.float32).tiny)
    d = s_hat + lam_l
    if lr_units == "adamw":
        root_free = (n / d).norm().item()
        adamw = (n / ((s_hat / B).sqrt() + 1e-8)).norm().item()
        r = gain * adamw / root_free if root_free > 0 else gain  # n = 0: any r, the step is 0
        d = d / r
    return d


def rootfree_adamw(
    mu,
    g,
    state,
    *,
    lr,
    betas=(0.9, 0.999),
    damping=0.0,
    weight_decay=0.0,
    batch_size,
    bias_correction=True,
    s0=0.0,
    relative_damping=3.0,
    lr_units="adamw",
) -> torch.Tensor:
    """RootFreeAdamW.

    µ ← µ·(1 − η·γ);  m ← β1·m + (1 − β1)·g;  s ← β2·s + (1 − β2)·B·g²;  ``bias_correction``
    divides m by (1 − β1^t) and s by (1 − β2^t);  µ ← µ − η·m / d with d of
    :func:`_adaptive_denominator` (the paper: s0 = 1, no bias correction, ρ = 0, paper units:
    d = s + λ).
    """
    eta, (beta1, beta2), lam, gamma, B = lr, betas, damping, weight_decay, batch_size
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, m=torch.zeros_like(mu), s=torch.full_like(mu, s0))
    state["t"] += 1
    t = state["t"]
    mu = mu * (1 - eta * gamma)
    state["m"] = beta1 * state["m"] + (1 - beta1) * g
    state["s"] = beta2 * state["s"] + (1 - beta2) * B * g**2
    m, s = state["m"], state["s"]
    if bias_correction:
        m = m / (1 - beta1**t)
        s = s / (1 - beta2**t)
    d = _adaptive_denominator(s, g, m, lam=lam, rho=relative_damping, lr_units=lr_units, B=B)
    return mu - eta * m / d


def rootfree_rmsprop(
    mu,
    g,
    state,
    *,
    lr,
    alpha=0.999,
    damping=0.0,
    momentum=0.9,
    weight_decay,
    batch_size,
    bias_correction=True,
    s0=0.0,
    relative_damping=3.0,
    lr_units="adamw",
) -> torch.Tensor:
    """RootFreeRMSprop (heavy-ball momentum after preconditioning).

    s ← α·s + (1 − α)·B·g² (ŝ = s/(1 − α^t) with ``bias_correction``);  u ← g / d (+ γ·µ in paper
    units);  b ← ρ·b + u (b = u if ρ = 0);  µ ← µ·(1 − η·γ in AdamW units) − η·b, with d of
    :func:`_adaptive_denominator` at gain 1 − ρ.
    """
    eta, lam, rho, gamma, B = lr, damping, momentum, weight_decay, batch_size
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, s=torch.full_like(mu, s0))
    state["t"] += 1
    state["s"] = alpha * state["s"] + (1 - alpha) * B * g**2
    s = state["s"] / (1 - alpha ** state["t"]) if bias_correction else state["s"]
    d = _adaptive_denominator(s, g, g, lam=lam, rho=relative_damping, lr_units=lr_units, B=B, gain=1 - rho)
    if lr_units == "adamw":
        mu = mu * (1 - eta * gamma)
        u = g / d
    else:
        u = g / d + gamma * mu
    if rho == 0:
        b = u
    else:
        b = rho * state.get("b", torch.zeros_like(mu)) + u
        state["b"] = b
    return mu - eta * b


def adax_c(t: int, beta2: float) -> float:
    """AdaX's bias correction c_t = (1 + β2)^t − 1, computed directly."""
    return (1 + beta2) ** t - 1


def adax(mu, g, state, *, lr, betas, eps, weight_decay) -> torch.Tensor:
    """AdaX-W in its original, unnormalized form.

    µ ← µ·(1 − η·γ);  m ← β1·m + (1 − β1)·g;  v ← (1 + β2)·v + β2·g²;  c_t = (1 + β2)^t − 1;
    µ ← µ − η·sqrt(c_t)·m / (sqrt(v) + ε), with m0 = 0, v0 = 0.
    """
    eta, (beta1, beta2), gamma = lr, betas, weight_decay
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, m=torch.zeros_like(mu), v=torch.zeros_like(mu))
    state["t"] += 1
    c_t = adax_c(state["t"], beta2)
    mu = mu * (1 - eta * gamma)
    state["m"] = beta1 * state["m"] + (1 - beta1) * g
    state["v"] = (1 + beta2) * state["v"] + beta2 * g**2
    return mu - eta * c_t**0.5 * state["m"] / (state["v"].sqrt() + eps)


def rootfree_adax_d(t: int, beta2: float, prior_steps: float) -> float:
    """D_t = (1 + n0·β2)·(1 + β2)^t − 1, computed directly."""
    return (1 + prior_steps * beta2) * (1 + beta2) ** t - 1


def rootfree_adax(
    mu,
    g,
    state,
    *,
    lr,
    betas=(0.9, 1e-4),
    damping=0.0,
    weight_decay,
    prior_steps=0.0,
    batch_size,
    s0=0.0,
    relative_damping=3.0,
    lr_units="adamw",
) -> torch.Tensor:
    """RootFreeAdaX.

    D_t = (1 + n0·β2)·(1 + β2)^t − 1;  β̂_t = 1 − β2 / D_t;  m ← β1·m + (1 − β1)·g;
    s ← β̂_t·s + (1 − β̂_t)·B·g²;  µ ← µ·(1 − η·γ) − η·m / d, with d of
    :func:`_adaptive_denominator`.
    """
    eta, (beta1, beta2), lam, gamma, n0, B = lr, betas, damping, weight_decay, prior_steps, batch_size
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, m=torch.zeros_like(mu), s=torch.full_like(mu, s0))
    state["t"] += 1
    beta_hat = 1 - beta2 / rootfree_adax_d(state["t"], beta2, n0)
    state["m"] = beta1 * state["m"] + (1 - beta1) * g
    state["s"] = beta_hat * state["s"] + (1 - beta_hat) * B * g**2
    d = _adaptive_denominator(
        state["s"], g, state["m"], lam=lam, rho=relative_damping, lr_units=lr_units, B=B
    )
    return mu * (1 - eta * gamma) - eta * state["m"] / d
