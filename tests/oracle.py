"""A naive float64 oracle for the element-wise optimizers, written from DESIGN.md §3.1–3.4.

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


def rootfree_adamw(
    mu, g, state, *, lr, betas, damping, weight_decay, batch_size, bias_correction=False
) -> torch.Tensor:
    """DESIGN §3.1: RootFreeAdamW.

    µ ← µ·(1 − η·γ);  m ← β1·m + (1 − β1)·g;  s ← β2·s + (1 − β2)·B·g²;  µ ← µ − η·m / (s + λ),
    with m0 = 0, s0 = 1; ``bias_correction`` divides m by (1 − β1^t) and s by (1 − β2^t).
    """
    eta, (beta1, beta2), lam, gamma, B = lr, betas, damping, weight_decay, batch_size
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, m=torch.zeros_like(mu), s=torch.ones_like(mu))
    state["t"] += 1
    t = state["t"]
    mu = mu * (1 - eta * gamma)
    state["m"] = beta1 * state["m"] + (1 - beta1) * g
    state["s"] = beta2 * state["s"] + (1 - beta2) * B * g**2
    m, s = state["m"], state["s"]
    if bias_correction:
        m = m / (1 - beta1**t)
        s = s / (1 - beta2**t)
    return mu - eta * m / (s + lam)


def rootfree_rmsprop(mu, g, state, *, lr, alpha, damping, momentum, weight_decay, batch_size) -> torch.Tensor:
    """DESIGN §3.2: RootFreeRMSprop (heavy-ball momentum after preconditioning).

    s ← α·s + (1 − α)·B·g²;  u ← g / (s + λ) + γ·µ;  b ← ρ·b + u (b = u if ρ = 0);  µ ← µ − η·b,
    with s0 = 1, b0 = 0.
    """
    eta, lam, rho, gamma, B = lr, damping, momentum, weight_decay, batch_size
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, s=torch.ones_like(mu))
    state["t"] += 1
    state["s"] = alpha * state["s"] + (1 - alpha) * B * g**2
    u = g / (state["s"] + lam) + gamma * mu
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
    """DESIGN §3.3: AdaX-W in its original, unnormalized form.

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


def rootfree_adax(mu, g, state, *, lr, betas, damping, weight_decay, prior_steps, batch_size) -> torch.Tensor:
    """DESIGN §3.4: RootFreeAdaX.

    D_t = (1 + n0·β2)·(1 + β2)^t − 1;  β̂_t = 1 − β2 / D_t;  m ← β1·m + (1 − β1)·g;
    s ← β̂_t·s + (1 − β̂_t)·B·g²;  µ ← µ·(1 − η·γ) − η·m / (s + λ), with m0 = 0, s0 = 1.
    """
    eta, (beta1, beta2), lam, gamma, n0, B = lr, betas, damping, weight_decay, prior_steps, batch_size
    mu, g = _float64(mu), _float64(g)
    if not state:
        state.update(t=0, m=torch.zeros_like(mu), s=torch.ones_like(mu))
    state["t"] += 1
    beta_hat = 1 - beta2 / rootfree_adax_d(state["t"], beta2, n0)
    state["m"] = beta1 * state["m"] + (1 - beta1) * g
    state["s"] = beta_hat * state["s"] + (1 - beta_hat) * B * g**2
    return mu * (1 - eta * gamma) - eta * state["m"] / (state["s"] + lam)
