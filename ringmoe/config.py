"""Every config key and its default: reference training recipe, router, mesh, probes.

The one place defaults live. Each config file (`configs/`) calls `base_config()` and
then states its own model numbers; the library completes a saved run's config from it.
Values marked (ref) are the RingMoE paper's (arXiv 2504.03166; DESIGN.md s.2).
"""
from ml_collections import ConfigDict

from ringmoe.data.schema import MODALITIES
from ringmoe.data.sensors import S2_BANDS, S2_L2A_ORDER

# Sentinel-2 L2A bands as a config states them: (name, central wavelength nm, bandwidth nm),
# from the one table of Sentinel-2 bands (`ringmoe.data.sensors.S2_BANDS`, DESIGN.md s.4).
S2_L2A_BANDS = tuple((name, float(S2_BANDS[name][0]), float(S2_BANDS[name][1])) for name in S2_L2A_ORDER)


def modality(channels: int, embed: str = "patch", bands=(), power_head: int = 0, unit: str = "") -> ConfigDict:
    """One input modality: its channel count and patch-embedding kind.

    unit, when stated, is the physical unit the config's numbers assume (schema.UNITS:
    'reflectance', 'db', 'complex'); the pipeline refuses a data set whose manifest
    says otherwise, so a config cannot silently describe its SAR-L2 channels as
    amplitude while the speckle NLL reads them as dB.

    power_head > 0 adds a second light decoder with that many channels, predicting
    log polarimetric powers (SAR-L1: span + 3 Pauli = 4) for the span/Pauli terms.

    embed (ringmoe.model.embed.EMBEDDINGS): 'patch' is a plain strided projection with
    fixed channels; 'wavelength' generates the projection from each band's (wavelength,
    bandwidth), so any subset of `bands` runs through the same weights; 'complex' is
    'patch' over Re/Im pairs with each pair's log power added (single-look SAR).
    """
    if embed == "wavelength" and len(bands) != channels:
        raise ValueError(f"wavelength embedding needs one band entry per channel ({channels})")
    return ConfigDict({"channels": channels, "embed": embed, "bands": tuple(bands), "power_head": power_head,
                       "unit": unit})


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.task = "pretrain"               # ringmoe.training.tasks.TASKS: pretrain (masked-image pretraining of
                                      # RingMoE) | rsmoe (vision-language tuning of RS-MoE on its encoder)

    c.model = ConfigDict()
    c.model.image_size = 192          # (ref) crop size
    c.model.patch_size = 4            # (ref)
    c.model.window_size = 12          # (ref)
    c.model.embed_dim = 448
    c.model.depths = (2, 2, 18, 2)
    c.model.num_heads = (14, 28, 56, 112)
    c.model.mlp_ratio = 4.0           # (ref)
    c.model.dtype = "float32"         # compute dtype; parameters stay float32
    c.model.remat = "none"            # none | block | dots_with_no_batch_dims_saveable | dots_saveable:
                                      # what each SwinV2 block keeps for the backward pass (model/ringmoe.py)
    c.model.scan_layers = True        # a stage's blocks as one scan over stacked parameters (model/scan.py);
                                      # False unrolls them (debugging; same values, one compile per block)
    c.model.modalities = ConfigDict()

    c.model.moe = ConfigDict()
    c.model.moe.enabled = True                  # False: one dense FFN per block
    c.model.moe.num_modal_experts = 4           # (ref) per modality
    c.model.moe.num_collaborative_experts = 4   # (ref) shared by all modalities
    c.model.moe.shared_expert = True            # (ref) dense, every token
    c.model.moe.router = "token_choice"         # ringmoe.model.router.ROUTERS: token_choice | dropless |
                                                # expert_choice | loss_free_bias
    c.model.moe.bias_update_rate = 1e-3         # loss_free_bias: selection-bias step per update (DeepSeek-V3)
    c.model.moe.top_k = 1                       # (ref)
    c.model.moe.capacity_factor = 1.2           # (ref)
    c.model.moe.dispatch = "auto"               # auto | einsum | sort | ragged
    c.model.moe.modal_experts_loop = False      # True: modalities' experts one at a time (jax.lax.map):
                                                # less memory and a faster TPU compile at 14.7B, a slower
                                                # step; False: vmapped (experts.route_by_modality)
    c.model.moe.load_balance_weight = 1e-3      # (ref) Switch loss
    c.model.moe.z_loss_weight = 0.0             # router z-loss (ST-MoE); 0 in the reference

    c.mesh = ConfigDict({"data": -1, "fsdp": 1, "expert": 1, "tensor": 1})

    # Input pipeline (ringmoe/data/pipeline.py); `python -m tools.make_synthetic` makes a data set.
    c.data_dir = ""                   # directory of ArrayRecord shards + manifest.json
    c.batch_size = 64                 # global images per step: all modalities, all processes
    c.data = ConfigDict()
    # Share of the rows per step for each modality (a modality absent from the data set
    # or the model is not served; 0 turns one off).
    c.data.modality_weights = ConfigDict({m: 1.0 for m in MODALITIES})
    c.data.crop_scale = (0.2, 0.5)    # (ref) random resized crop, fraction of the record's area
    c.data.crop_ratio = (3 / 4, 4 / 3)  # crop aspect-ratio range
    c.data.flip = True                # random horizontal and vertical flips
    c.data.mask_block_size = 32       # (ref) SimMIM mask block, pixels
    c.data.mask_ratio = 0.6           # (ref) share of blocks masked
    c.data.shared_mask = False        # True: one mask for all modalities of a paired record
    c.data.shuffle = True             # global shuffle from c.seed, re-drawn every epoch
    c.data.num_epochs = 0             # 0 = repeat forever
    c.data.num_workers = 0            # Grain worker processes; 0 = in-process
    c.data.prefetch = 2               # batches buffered per worker (or by one thread when 0 workers)
    c.data.read_threads = 2           # threads reading + transforming records in each process
    c.data.max_bad_records = 0        # 0: first bad record is an error; K: skip and count up to K

    # Training (ref: AdamW (0.9, 0.999), eps 1e-8, wd 0.05, lr 2.5e-4, warm-up 200 steps
    # from 1e-6, cosine to 5e-7, gradient clip 5.0).
    c.total_steps = 100_000
    c.grad_accum_steps = 1            # micro-batches per update (each modality's rows split evenly)
    c.log_every = 50                  # metrics / console line every N steps
    c.checkpoint_every = 1000         # async Orbax save every N steps (and on SIGTERM, and at the end)
    c.keep_checkpoints = 3
    c.image_every = 0                 # reconstruction / expert-load PNGs every N steps (0: at the end only)
    c.pictures = True                 # those PNGs at all (False: none, nor the forward pass compiled to draw them)
    c.eval_every = 0                  # loss on fixed batches every N steps, at step 0 and at the end (0: off)
    c.eval_batches = 2                # those batches: drawn once with seed + 1 (same records, other crops/masks)
    c.collective_timeout_s = 600.0    # the longest any process waits for the others at start-up, a
    #                                   checkpoint or a restore; then an error naming who did not arrive
    c.max_nonfinite_steps = 5         # NaN/Inf updates skipped in a row before the run stops (and a
    #                                   shorter run whose every update was skipped fails at its end)
    c.optimizer = ConfigDict({"lr": 2.5e-4, "init_lr": 1e-6, "end_lr": 5e-7, "warmup_steps": 200,
                              "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.05, "grad_clip": 5.0})

    # Pretraining objectives (ringmoe/objectives/terms.py). Each number is a term's weight;
    # 0 turns it off (not computed, not logged). The reference is SimMIM + span (SAR-L1);
    # the other physics terms are ours, weighted so that near a good reconstruction each
    # pulls no harder than SimMIM (first guesses, to be tuned by ablation).
    c.objectives = ConfigDict()
    c.objectives.simmim = 1.0         # (ref) masked L1 on normalised pixels / channels, every modality
    c.objectives.span = 1.0           # (ref) SAR-L1 span: Gamma deviance L(e^d - d - 1), d = ln(P/P_ref + eps) - x
    c.objectives.pauli = 0.5          # SAR-L1 Pauli powers, same deviance; half: they re-split the span
    c.objectives.speckle_nll = 0.1    # SAR-L2 Gamma NLL L(e^d - d - 1); curvature L * (dB std ln10/10)^2
                                      # per normalised unit is ~5x SimMIM's scale, hence 0.1
    c.objectives.xpol_ratio = 0.1     # SAR-L2 (VH - VV) dB ratio, MSE in ln units; speckle-noisy target
    c.objectives.sam = 0.5            # multispectral spectral angle (radians, typically 0.05-0.2)
    c.objectives.index = 0.5          # multispectral NDVI/NDWI/NDBI L1 (indices in [-1, 1])
    c.objectives.cross_modal = False  # paired records: decode A's masked pixels from B's features
    c.objectives.cross_modal_weight = 0.5  # an extra SimMIM-like L1, so below SimMIM's 1.0
    c.objectives.sar_looks = 4.4      # L of the speckle NLL: ~4.4 for S1 GRD IW (ENL); 1 for SLC
    c.objectives.speckle_max_log_ratio = 5.0  # e^d linear beyond d = 5 (~22 dB under-prediction);
                                      # speckle_nll, span and pauli alike
    # Looks L of the span / Pauli deviances. The minimiser, ln E[P/P_ref + eps], does not depend
    # on L; L weights the term like a likelihood. Single-look quad-pol, reciprocal (S_HV = S_VH):
    # span = |HH|^2 + 2|HV|^2 + |VV|^2, three exponential powers of means s_HH, 2 s_HV, s_VV
    # (HV and VH are one look, not two). Assuming them independent (reflection symmetry makes
    # co- and cross-pol uncorrelated; the HH-VV correlation rho is neglected, it would add
    # 2 |rho|^2 s_HH s_VV to Var and lower L), ENL = E[P]^2 / Var[P]
    # = (s_HH + 2 s_HV + s_VV)^2 / (s_HH^2 + 4 s_HV^2 + s_VV^2): at most 3 (when 2 s_HV = s_HH =
    # s_VV); with s_HH = s_VV and cross-pol 7 dB below co-pol (s_HV = 0.2 s_HH) 2.4^2 / 2.16 = 2.67.
    c.objectives.span_looks = 2.7
    c.objectives.pauli_looks = 1.0    # single-look: each Pauli power is |z|^2 of one circular Gaussian z
    c.objectives.power_eps = 1e-3     # log-power floor, relative to the data set's mean span (-30 dB)
    c.objectives.sam_eps = 1e-6       # reflectance-norm floor in SAM (all-zero spectra stay finite)
    # Reflectance floor of the indices, (a - b) / (|a| + |b| + eps): |d index / d a| <= 1/eps = 20
    # per unit reflectance, instead of ~1 / (a + b) (41 over water, NIR 0.01 red 0.025; unbounded
    # at 0), so dark noisy pixels cannot dominate; a reflectance error of 0.01 per band moves an
    # index by at most sqrt(2) 0.01 / eps = 0.28. The same floor for reconstruction and target
    # (loss 0 at a perfect one); it shrinks dark pixels' indices towards 0 (spectral.py).
    c.objectives.index_eps = 0.05
    c.objectives.indices = ("ndvi", "ndwi", "ndbi")  # of ndvi, ndwi, ndbi, mndwi
    c.objectives.index_tolerance_nm = 35.0  # a band serves for an S2 one within this (B8A/OLI NIR for B8)
    c.objectives.sar_l1_polarizations = ("HH", "HV", "VH", "VV")  # Re/Im interleaved (sar_l1_quadpol)
    c.objectives.sar_l2_polarizations = ("VV", "VH")               # dB channels (sentinel1_db)
    # These are every objective setting and the only place their defaults are written: the
    # loss reads each key without a fallback and refuses keys it does not know
    # (loss.check_objectives). Locked, so a misspelt key in a config file fails where it is
    # written (`--config.objectives.spann=1` already fails in config_flags).
    c.objectives.lock()

    # Frozen-encoder evaluation (ringmoe/eval, `python -m tools.evaluate`). The linear heads
    # are trained full-batch with AdamW on standardised features.
    c.probe = ConfigDict({
        "knn_k": 20,                      # neighbours voting in the kNN probe (DINO uses 20)
        "pooling": "stages",              # scene features: mean + std of every stage's map ("final": final mean)
        "linear_solver": "lbfgs",         # scene-label logistic regression: "lbfgs" (L-BFGS to convergence, L2
                                          # chosen on 20 % of the training records) | "adamw" (linear_epochs steps)
        "linear_maps": "validated",       # pooling "stages", L-BFGS: the maps the head reads: "all" | "validated"
                                          # (all, or one stage's map alone: the best on the validation records)
                                          # | one map by name, "stage0" .. "final" (where the class is)
        "linear_lbfgs_steps": 300,        # L-BFGS iterations per fit (converged by ~300 on the demo's features)
        "linear_epochs": 300,             # full-batch AdamW steps of the scene-label logistic regression
        "linear_lr": 1e-2,
        "linear_weight_decay": 1e-4,      # on the weight matrix only, not the bias
        "segmentation_stage": 1,          # encoder stage whose pre-merge map feeds the 1x1 head (stride 8)
        "segmentation_epochs": 300,       # full-batch AdamW steps of the 1x1 segmentation head
        "segmentation_lr": 5e-2,          # 300 steps at 5e-2 reach what 3000 at 1e-2 do on stage maps
        "segmentation_weight_decay": 1e-4,
        "test_fraction": 0.2,             # share of labelled records held out (unless the manifest has "splits")
        "seed": 0,                        # train/test split and head initialisation
    })

    # Compression to a dense model (ringmoe/compress, `python -m tools.compress`).
    c.compress = ConfigDict({
        "calibration_images": 512,        # images of the modality whose routing picks and weights experts
        "keep_collaborative": 0.25,       # (ref) share of collaborative experts kept per layer
        "distill_steps": 1000,            # ours: the reference stops after the SVD merge
        "distill_lr": 1e-4,               # peak AdamW rate (warm-up, cosine) of the dense student
        "distill_warmup_steps": 50,
        "feature_weight": 1.0,            # MSE of layer-normalised stage features, student vs teacher
        "reconstruction_weight": 1.0,     # the pretraining objective of the modality, on masked input
    })

    # Sparse upcycling of a dense model into this config's MoE (ringmoe/upcycle, `python -m tools.upcycle`).
    c.upcycle = ConfigDict({
        "router_init": "random",          # ringmoe.upcycle.routers.ROUTER_INITS: random | kmeans | uniform
        "noise": 0.0,                     # Gaussian noise on each expert copy, std relative to the weight's
        "reinit_fraction": 0.0,           # Drop-Upcycling: share of each expert's hidden units re-initialised
        "calibration_images": 64,         # kmeans: images per modality whose FFN inputs are clustered
        "kmeans_tokens": 8192,            # kmeans: tokens per modality and block sampled from those
        "kmeans_iterations": 25,          # kmeans: Lloyd iterations (spherical k-means)
        "source_key": "",                 # set by tools.ablate: the config key of the dense run upcycled, so
                                          # that a changed first stage retrains the second (provenance only)
    })

    # RS-MoE vision-language tuning (task "rsmoe"; ringmoe/vlm, configs/rsmoe_tiny.py). `model` above
    # is then the vision encoder, read from `vlm.encoder` (a pretraining run or saved model).
    c.vlm = ConfigDict({
        "encoder": "",                    # RingMoE checkpoint (training run or saved model); "" = random
                                          # init (tests only: a warning says so)
        "freeze_encoder": True,           # no gradient or update reaches the encoder
        "init_from": "",                  # stage 2: the stage-1 (dense, num_experts 1) run whose state this
                                          # run starts from, its LM copied into every expert (ringmoe.vlm.upcycle)
        "tokenizer": "",                  # tokenizer.json of an imported LM; "" = byte-level BPE of lm.vocab_size
                                          # trained on the data set's text (saved in the workdir)
        "lm": ConfigDict({"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_layers": 2,
                          "num_heads": 4, "num_kv_heads": 2, "head_dim": None, "rope_theta": 10000.0,
                          "rope_scaling": None, "rms_norm_eps": 1e-6, "tie_embeddings": False,
                          "attention_bias": True, "max_positions": 512, "dtype": "float32"}),
        "num_experts": 3,                 # K lightweight LMs; 1 = the dense stage-1 model
        "top_k": 1,                       # experts per sub-task
        "capacity_factor": 1.5,           # rows per expert: ceil(factor * rows * top_k / K) (overflow dropped, counted)
        "vision_stages": (-1,),           # encoder stages whose maps the queries read (-1: the last, normed;
                                          # an earlier one's pre-merge map through an adapter)
        "projector": "qformer",           # ringmoe.vlm.rsmoe.PROJECTORS: qformer (learned queries cross-attending
                                          # to the vision tokens) | linear (every vision token projected, as LLaVA)
        "router_input": "instruction",    # ringmoe.vlm.rsmoe.ROUTER_INPUTS, what the gate reads: instruction (the
                                          # paper's instruction router) | instruction_and_image (also the pooled
                                          # visual queries)
        "prompt_input": "instruction",    # ROUTER_INPUTS again, what the experts' FiLM prompts read
        "num_queries": 16,                # query-transformer queries (InstructBLIP: 32)
        "query_layers": 2,
        "query_heads": 4,
        "prompt_length": 4,               # soft-prompt vectors the router writes for each expert
        "subtasks_per_image": 4,          # (instruction, answer) pairs drawn per image and step
        "instruction_length": 24,         # tokens (left-padded; longer are cut and counted)
        "answer_length": 48,              # tokens incl. the end token (right-padded; longer cut and counted)
        "load_balance_weight": 1e-2,      # router losses, as the vision MoE's (model/router.py)
        "z_loss_weight": 1e-3,
    })
    return c
