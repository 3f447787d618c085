"""The `consistency` metric: does one jump t→r land where two jumps t→s→r land? (docs/math.md §13)

The exact transition composes: Φ_{s→r}(Φ_{t→s}(x)) = Φ_{t→r}(x), i.e. for OT-FM
(t-r)·F(x,t,r) = (t-s)·F(x,t,s) + (s-r)·F(x_s,s,r). A trained network only approximates this, and the gap is a
model-only quality signal that needs no data and no feature network:

    consistency = rms(one - two) / rms(one)   over samples, dims and the (t, s, r) triples below,

with one = transition(x_t, F(x_t, t, r), t, r) and two the same through s. The states x_t are the model's own:
noise at t = T_max, else one jump T_max → t from that noise. The network is queried without guidance (CFG mixes two
transition fields, which need not compose even when each does). 0 means exactly composable (F ≡ 0 at
initialisation is, trivially); a flow-matching velocity used as a jump is not.
"""
from __future__ import annotations

import torch

from tim_ray.transition.paths import TransitionPath

# (t, s, r) as fractions of T_max: long and short jumps, from pure noise and from inside the path.
TRIPLES = ((1.0, 0.5, 0.0), (1.0, 0.8, 0.0), (1.0, 0.75, 0.5), (0.75, 0.5, 0.25), (0.5, 0.25, 0.0))


def _jump(model, path: TransitionPath, x: torch.Tensor, t: float, r: float, cond: dict) -> torch.Tensor:
    t_vec = torch.full((len(x),), t, dtype=x.dtype, device=x.device)
    r_vec = torch.full((len(x),), r, dtype=x.dtype, device=x.device)
    return path.transition(x, model(x, t_vec, r_vec, **cond).to(x.dtype), t_vec, r_vec)


@torch.no_grad()
def composition_error(model, path: TransitionPath, noise: torch.Tensor, cond: dict | None = None,
                      triples=TRIPLES) -> dict[str, float]:
    """{"consistency": overall relative error, "consistency.<t>-<s>-<r>": per triple} for the states reached from
    `noise` (N, ...) under `cond` (a dict of N-row tensors, or None). Times are fractions of T_max."""
    cond = cond or {}
    squared_gap = squared_norm = 0.0
    out = {}
    for t, s, r in triples:
        t, s, r = (f * path.t_max for f in (t, s, r))
        x_t = noise if t == path.t_max else _jump(model, path, noise, path.t_max, t, cond)
        one = _jump(model, path, x_t, t, r, cond)
        two = _jump(model, path, _jump(model, path, x_t, t, s, cond), s, r, cond)
        gap, norm = (one - two).pow(2).mean().item(), one.pow(2).mean().item()
        out[f"consistency.{t:g}-{s:g}-{r:g}"] = (gap / norm) ** 0.5 if norm > 0 else 0.0
        squared_gap, squared_norm = squared_gap + gap, squared_norm + norm
    overall = (squared_gap / squared_norm) ** 0.5 if squared_norm > 0 else 0.0
    return {"consistency": overall, **out}
