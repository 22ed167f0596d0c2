"""The RingMoE encoder, top-down.

    pixels of modality m --(m's patch embedding)--> tokens
      --(SimMIM: masked tokens <- mask token)-->
      4 SwinV2 stages (attention, merging and norms shared by all modalities;
                       every FFN a hierarchical MoE that knows m)
      --> stride-32 features --(m's SimMIM decoder)--> reconstructed pixels

Every modality has its own patch embedding (its own channel count), then all
modalities of a batch whose tokens share a shape run through the backbone in one
pass, their images interleaved (`RingMoE.encode_all`); a token of m can only
reach m's modal experts.

A stage's blocks are scanned (`config.scan_layers`, `ringmoe.model.scan`): stored with
a leading layers axis and run as a loop over (plain, shifted) pairs, so the 18-block
stage of the 14.7B model compiles like a 2-block one.

Rematerialisation (`config.remat`, see `REMAT`) wraps each SwinV2 block in
`nnx.remat`: the backward pass recomputes what the policy did not save, so the
activations kept for the gradient shrink from every intermediate of every block
to (at most) the block inputs. It changes memory and recompute, never values.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ringmoe.model import scan
from ringmoe.model.decoders import SimMIMDecoder
from ringmoe.model.embed import WavelengthPatchEmbed, build_embedding
from ringmoe.model.moe import DenseFFN, HierarchicalMoE
from ringmoe.model.swin import LayerNorm, PatchMerging, SwinV2Block
from ringmoe.sharding import constrain, partitioned, state_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# config.remat -> what a rematerialised block keeps for its backward pass (None: no remat).
# "block" keeps only the block's inputs (jax.checkpoint's default: everything recomputed);
# the others are `jax.checkpoint_policies` of that name.
REMAT = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat_policy(name: str):
    """The checkpoint policy of a `config.remat` name (None for "none"); unknown names are errors."""
    if name not in REMAT:
        raise ValueError(f"unknown model.remat {name!r}; choose one of {sorted(REMAT)}")
    return REMAT[name]


class Encoded(NamedTuple):
    features: jax.Array            # (B, h, w, D_last), after the final norm
    stage_features: tuple          # per stage (B, h_i, w_i, D_i), before merging
    router_stats: tuple            # per block: {'modal'|'collaborative': route() statistics of these images}


class Stage(nnx.Module):
    """`depth` SwinV2 blocks (alternating plain / shifted windows), then patch merging.

    With `config.scan_layers` (the default) the blocks are one block with stacked
    parameters (`ringmoe.model.scan`), run as a loop over (plain, shifted) pairs: one
    pair is traced whatever the depth. With False, a list of blocks run one after
    another (for debugging: same values). With `config.remat` other than "none" each
    block is rematerialised (`jax.checkpoint` inside the loop, `nnx.remat` unrolled)."""

    def __init__(self, dim, depth, num_heads, resolution, config, modalities, *, merge, dtype, rngs):
        hidden = int(dim * config.mlp_ratio)
        self.remat = config.get("remat", "none")
        remat_policy(self.remat)  # an unknown name fails at construction, not at the first step
        self.depth, self.resolution, self.scanned = depth, resolution, config.scan_layers

        def ffn():
            if config.moe.enabled:
                return HierarchicalMoE(dim, hidden, modalities, config.moe, dtype=dtype, rngs=rngs)
            return DenseFFN(dim, hidden, dtype=dtype, rngs=rngs)

        blocks = [SwinV2Block(dim, num_heads, resolution, config.window_size, shift=bool(i % 2), ffn=ffn(),
                              dtype=dtype, rngs=rngs) for i in range(depth)]
        self.blocks = scan.stack(blocks) if self.scanned else nnx.List(blocks)
        self.merging = PatchMerging(dim, dtype=dtype, rngs=rngs) if merge else None

    def __call__(self, x, modalities: tuple[str, ...]):
        """x: the interleaved images of `modalities` (`RingMoE.encode_all`) -> (merged x, x
        before merging, per block {modality: router statistics})."""
        policy = remat_policy(self.remat)
        if self.scanned:
            x, stats = scan.scan_blocks(self.blocks, x, modalities, self.depth, policy)
        else:
            def run(block, x):
                return block(x, modalities)

            if policy is not None:
                run = nnx.remat(run, policy=policy)
            stats = []
            for block in self.blocks:
                x, block_stats = run(block, x)
                stats.append(block_stats)
        before_merge = x
        if self.merging is not None:
            x = self.merging(x)
        return x, before_merge, list(stats)


class RingMoE(nnx.Module):
    """Hierarchical-MoE SwinV2 encoder with per-modality embeddings and decoders."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.modalities = tuple(config.modalities.keys())
        self.patch_size = config.patch_size
        # (wavelength nm, bandwidth nm) per band, for wavelength-conditioned embeddings.
        self.band_spectra = {m: tuple((b[1], b[2]) for b in config.modalities[m].bands) for m in self.modalities}
        self.dtype = DTYPES[config.dtype]
        grid = config.image_size // config.patch_size
        if config.image_size % config.patch_size or grid % 2 ** (len(config.depths) - 1):
            raise ValueError(f"image_size {config.image_size} must be divisible by patch_size "
                             f"{config.patch_size} * 2**{len(config.depths) - 1}")
        dim = config.embed_dim
        self.embeddings = nnx.Dict({
            m: build_embedding(config.modalities[m].embed, config.modalities[m].channels, dim, config.patch_size,
                               dtype=self.dtype, rngs=rngs) for m in self.modalities})
        self.mask_token = nnx.Param(partitioned(nnx.initializers.truncated_normal(0.02), "embed")(
            rngs.params(), (dim,)))
        stages = []
        for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads)):
            last = i == len(config.depths) - 1
            stages.append(Stage(dim * 2 ** i, depth, heads, grid // 2 ** i, config, self.modalities,
                                merge=not last, dtype=self.dtype, rngs=rngs))
        self.stages = nnx.List(stages)
        self.out_dim = dim * 2 ** (len(config.depths) - 1)
        self.norm = LayerNorm(self.out_dim, rngs=rngs)
        self.stride = config.patch_size * 2 ** (len(config.depths) - 1)
        self.decoders = nnx.Dict({m: SimMIMDecoder(self.out_dim, self.stride, config.modalities[m].channels,
                                                   rngs=rngs) for m in self.modalities})
        # Physics targets that the pixels cannot carry (SAR-L1 log span / Pauli powers).
        self.power_decoders = nnx.Dict({m: SimMIMDecoder(self.out_dim, self.stride, heads, rngs=rngs)
                                        for m in self.modalities
                                        if (heads := config.modalities[m].get("power_head", 0))})

    def spectra(self, modality: str) -> tuple[jax.Array, jax.Array]:
        """Central wavelengths and bandwidths (nm) of the configured bands."""
        spectra = jnp.asarray(self.band_spectra[modality], jnp.float32).reshape(-1, 2)
        return spectra[:, 0], spectra[:, 1]

    def embed(self, pixels, modality, mask=None, spectra=None) -> jax.Array:
        """Patch tokens (B, h, w, D); where `mask` (B, h, w) is True the mask token replaces them."""
        if modality not in self.modalities:
            raise ValueError(f"modality {modality!r} is not in this model ({', '.join(self.modalities)})")
        pixels = constrain(pixels, "batch", None, None, None)
        embedding = self.embeddings[modality]
        if isinstance(embedding, WavelengthPatchEmbed):
            tokens = embedding(pixels, *(spectra if spectra is not None else self.spectra(modality)))
        else:
            tokens = embedding(pixels)
        if mask is not None:
            tokens = jnp.where(mask[..., None], self.mask_token[...].astype(tokens.dtype), tokens)
        return tokens

    def encode(self, pixels, modality, mask=None, spectra=None, valid=None) -> Encoded:
        """One modality's images through the encoder: `encode_all` of a one-modality batch."""
        inputs = {"pixels": pixels, "mask": mask, "spectra": spectra, "valid": valid}
        return self.encode_all({modality: inputs})[modality]

    def encode_all(self, batch: dict) -> dict[str, Encoded]:
        """batch[m] = {'pixels': (B_m, H, W, C_m), 'mask'?, 'valid'?, 'spectra'?} -> {m: Encoded}.

        `valid` (B, H, W) bool, optional: pixels without data are replaced by 0 (the band
        mean) before the embedding, so whatever they hold reaches no output.

        Every modality is embedded by its own patch embedding; then all modalities whose
        tokens have one shape (batch size and grid) go through the backbone together, in
        one pass (`passes`). Their images are interleaved, image b of the i-th modality at
        row b * M + i, so a shard of the batch axis holds whole groups of M images and a
        modality's images are a static strided slice on every device (the modal experts
        take theirs, `HierarchicalMoE`). Attention, norms, merging, collaborative and
        shared experts see one batch of all modalities: the same model as one pass per
        modality (`tests/test_model.py`), traced and compiled once.
        """
        out = {}
        for modalities in self.passes(batch):
            count = len(modalities)
            tokens = []
            for m in modalities:
                inputs = batch[m]
                pixels, valid = inputs["pixels"], inputs.get("valid")
                if valid is not None:
                    pixels = jnp.where(valid[..., None], pixels, jnp.zeros((), pixels.dtype))
                tokens.append(self.embed(pixels, m, inputs.get("mask"), inputs.get("spectra")))
            x = jnp.stack(tokens, axis=1).reshape(-1, *tokens[0].shape[1:])
            stage_features, stats = [], []
            for stage in self.stages:
                x, before_merge, stage_stats = stage(x, modalities)
                stage_features.append(before_merge)
                stats.extend(stage_stats)
            features = self.norm(x.astype(jnp.float32))
            for i, m in enumerate(modalities):
                def own(a, i=i):   # modality i's images of an interleaved batch
                    return a.reshape(-1, count, *a.shape[1:])[:, i]
                out[m] = Encoded(own(features), tuple(own(f) for f in stage_features),
                                 tuple(block[m] for block in stats))
        return out

    def passes(self, batch: dict) -> list[tuple[str, ...]]:
        """The backbone passes of a batch: its modalities grouped by the shape of their
        tokens (batch size, height, width of the pixels; the patch size is shared), in
        the model's modality order. A config whose modalities share the crop size and
        batch size has one pass."""
        unknown = [m for m in batch if m not in self.modalities]
        if unknown:
            raise ValueError(f"modality {unknown[0]!r} is not in this model ({', '.join(self.modalities)})")
        groups: dict[tuple, list[str]] = {}
        for m in self.modalities:
            if m in batch:
                groups.setdefault(tuple(batch[m]["pixels"].shape[:3]), []).append(m)
        return [tuple(g) for g in groups.values()]

    def __call__(self, batch: dict) -> dict:
        """batch[m] = {'pixels': (B_m, H, W, C_m), 'mask': (B_m, h, w) optional,
        'valid': (B_m, H, W) optional, 'spectra' optional}; other keys are ignored.

        Returns per modality {'reconstruction': (B_m, H, W, C_m), 'encoded': Encoded} and,
        with a power decoder, 'log_power': (B_m, H, W, K).
        """
        encoded = self.encode_all(batch)
        out = {}
        for modality in batch:
            features = encoded[modality].features
            out[modality] = {"reconstruction": self.decoders[modality](features), "encoded": encoded[modality]}
            if modality in self.power_decoders:
                out[modality]["log_power"] = self.power_decoders[modality](features)
        return out


class ParamKeys:
    """The `rngs` a RingMoE is built with: params() returns fold_in(key(seed), i) for
    i = 0, 1, ..., the same keys as `nnx.Rngs(seed).params()`.

    nnx.Rngs counts in a state variable, and under tracing (`jax.eval_shape`, the jitted
    initialisers) every update of it makes JAX describe the tracer's origin, which costs
    time proportional to the trace so far: quadratic in the parameter count, 16 s of the
    17 s the 14.7B model took to build abstractly. A Python counter costs nothing.
    """

    def __init__(self, seed: int):
        self.key = jax.random.key(seed)
        self.count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key



def create_model(model_config, seed: int, mesh=None) -> RingMoE:
    """Builds RingMoE with its parameters initialised inside one `jax.jit`.

    One compiled initialiser is far faster than thousands of eager ops, and with
    a `mesh` each parameter is created directly in its sharded layout (logical
    names -> `sharding.LOGICAL_RULES`), never as a full host copy. The
    initialiser runs once, so it is compiled without backend optimisation,
    which halves its compile time on CPU.
    """
    def init():
        return nnx.split(RingMoE(model_config, rngs=ParamKeys(seed)))

    graphdef, abstract_state = jax.eval_shape(init)
    out_shardings = (None, state_shardings(abstract_state, mesh)) if mesh is not None else None
    compiled = jax.jit(init, out_shardings=out_shardings).lower().compile(
        {"xla_backend_optimization_level": 0})
    return nnx.merge(*compiled())
