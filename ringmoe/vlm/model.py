"""The vision-language model RS-MoE trains: the RingMoE encoder and RS-MoE on its last stage.

    batch[m]: pixels (B, H, W, C_m), valid, and the sub-tasks' tokens (B, N, I) / (B, N, A)
      -> encoder.encode_all (frozen: stop_gradient)   -> last-stage tokens (B, h*w, D)
      -> RSMoE.loss (query transformer, instruction router, the chosen LM experts)

Every served modality's images go through the encoder as in pretraining (one backbone
pass for modalities sharing a grid); their sub-tasks are one set of rows for RS-MoE.
`spec_of(config)` is the one place a config's `vlm` section becomes an `RSMoESpec`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.model.ringmoe import ParamKeys, RingMoE
from ringmoe.text.llama import LMSpec
from ringmoe.vlm.rsmoe import RSMoE, RSMoESpec

TEXT_INPUTS = ("instruction", "instruction_valid", "answer", "answer_valid")


def spec_of(config) -> RSMoESpec:
    """RS-MoE's shape from `config.vlm`, reading the encoder's output width from `config.model`."""
    v, m = config.vlm, config.model
    return RSMoESpec(lm=LMSpec.from_config(v.lm), vision_dim=m.embed_dim * 2 ** (len(m.depths) - 1),
                     num_experts=v.num_experts, top_k=v.top_k, num_queries=v.num_queries,
                     query_layers=v.query_layers, query_heads=v.query_heads, prompt_length=v.prompt_length,
                     capacity_factor=v.capacity_factor, projector=v.projector,
                     router_input=v.router_input, prompt_input=v.prompt_input)


class VisionLanguageModel(nnx.Module):
    """`encoder` (RingMoE, `config.model`) and `rsmoe` (RSMoE, `config.vlm`).

    The vision tokens are the encoder's maps of `vlm.vision_stages`: the last stage's normed
    features as they are, an earlier stage's pre-merge map through its own adapter (LayerNorm,
    then a linear map to the last stage's width; trained with RS-MoE), all concatenated along
    the token axis. An earlier, finer map keeps where things are (the tiny encoder's last stage
    is 2 x 2 tokens)."""

    def __init__(self, config, *, rngs: ParamKeys):
        self.encoder = RingMoE(config.model, rngs=rngs)
        self.rsmoe = RSMoE(spec_of(config), rngs=nnx.Rngs(rngs.params()))
        self.frozen = bool(config.vlm.freeze_encoder)
        depths, dim = config.model.depths, config.model.embed_dim
        self.stages = tuple(sorted({s % len(depths) for s in config.vlm.vision_stages}))
        width = dim * 2 ** (len(depths) - 1)
        adapter_rngs = nnx.Rngs(rngs.params())
        self.adapters = nnx.Dict({str(s): _Adapter(dim * 2 ** s, width, rngs=adapter_rngs)
                                  for s in self.stages if s != len(depths) - 1})

    def vision_tokens(self, batch: dict) -> dict[str, jax.Array]:
        """{modality: tokens (B, S, D) of the `vision_stages` maps} of the batch's images (no mask)."""
        inputs = {m: {"pixels": b["pixels"], "valid": b.get("valid")} for m, b in batch.items()}
        out = {}
        for m, encoded in self.encoder.encode_all(inputs).items():
            maps = []
            for s in self.stages:
                x = encoded.features if str(s) not in self.adapters else encoded.stage_features[s]
                x = x.reshape(x.shape[0], -1, x.shape[-1])
                x = jax.lax.stop_gradient(x) if self.frozen else x
                maps.append(self.adapters[str(s)](x) if str(s) in self.adapters else x)
            out[m] = jnp.concatenate(maps, 1)
        return out

    def loss(self, batch: dict, *, balance_weight: float, z_weight: float) -> tuple[jax.Array, dict]:
        """RS-MoE's loss over every modality's rows together (`RSMoE.loss`)."""
        vision = self.vision_tokens(batch)
        modalities = list(batch)
        cat = lambda key: jnp.concatenate([batch[m][key] for m in modalities], 0)  # noqa: E731
        return self.rsmoe.loss(jnp.concatenate([vision[m] for m in modalities], 0),
                               *(cat(k) for k in TEXT_INPUTS), balance_weight=balance_weight, z_weight=z_weight)


class _Adapter(nnx.Module):
    """LayerNorm then a linear map: an earlier stage's tokens in the last stage's width."""

    def __init__(self, dim: int, width: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.proj = nnx.Linear(dim, width, rngs=rngs)

    def __call__(self, x):
        return self.proj(self.norm(x.astype(jnp.float32)))
