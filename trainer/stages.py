"""How layers are placed on pipeline stages (light: no torch, used by the config and the planner).

Layers the pipeline size does not divide evenly are taken from the first and last stages, which
also hold the embedding and the output layer (Llama 3.1 405B: 126 layers on 8 stages = 15, 16 x 6,
15); megatron is told the first and last stage counts.
"""

from __future__ import annotations


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage; an uneven remainder is taken from the first and last stages."""
    per = -(-num_layers // pp)
    layers = [per] * pp
    deficit, i = per * pp - num_layers, 0
    while deficit:
        layers[0 if i % 2 == 0 or pp == 1 else -1] -= 1
        deficit, i = deficit - 1, i + 1
    return layers


def layer_split_problem(num_layers: int, pp: int, vpp: int | None) -> str | None:
    """Why megatron cannot place `num_layers` on pp stages x vpp virtual stages, or None."""
    layers = stage_layers(num_layers, pp)
    v = vpp or 1
    if min(layers) < v:
        return f"{num_layers} layers cannot fill {pp} pipeline stages x {v} virtual stages"
    if pp > 2 and any(n != layers[1] for n in layers[1:-1]):
        return f"{num_layers} layers do not split evenly over the middle pipeline stages ({layers})"
    if any(n % v for n in layers):
        return f"pipeline stages of {layers} layers are not divisible by {v} virtual stages"
    return None
