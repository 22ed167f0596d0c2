"""Knowledge compression: every block's remaining experts become one dense FFN by truncated SVD
(the `svd` merge; `refit.py` starts from it and refits the output layers on calibration tokens).

A block's MoE output is  sum over routed experts e of gate_e(x) FFN_e(x)  plus the
shared expert. Replacing each gate by its mean over the calibration tokens
(`gate_mass / tokens`: the shared expert's is 1) gives the expected output
sum_e w_e FFN_e(x): one FFN of width sum_e F_e whose hidden units are every
expert's, the output rows of expert e scaled by w_e. It is cut to the standard
width F as in the reference: each expert group present (modal, collaborative,
shared) gets F / N hidden units (N groups), shared among the group's experts in
proportion to their mean gate (D'Hondt apportionment, so an expert the routers
never chose gets none).

Expert e keeps r_e directions of its hidden space: the top left singular
vectors P (F_e, r_e) of [W_in^T | w_e W_out] (F_e, 2D), the subspace that holds
most of both its input and its (weighted) output maps. Then
W_in' = W_in P, b_in' = b_in P, W_out' = P^T w_e W_out, b_out' = sum_e w_e b_out_e.
An expert that keeps its full width keeps its own hidden units (exact, given the
mean gate). A truncated one is approximate, even for a linear activation: with the
identity in place of the GELU, expert e maps x to (x W_in + b_in) w_e W_out and its
merge to (x W_in + b_in) P P^T w_e W_out, equal for every x iff
[W_in; b_in] (I - P P^T) W_out = 0. The projection guarantees that only when
r_e >= rank [W_in^T | w_e W_out] (then P P^T w_e W_out = w_e W_out), a rank of up to
min(F_e, 2D). The budgets are well below it: F / N units per group, split among
its experts; in the 14.7B model (F = 4D, 3 groups, 4 modal experts, 1 collaborative
after pruning) about D/3 per modal expert and 4D/3 for the collaborative and the
shared expert, against ranks of up to 2D. (For a linear activation the best rank-r
map would be the truncated SVD of the product [W_in; b_in] w_e W_out, not of the
stacked matrix.) The merge is thus approximate twice over: the truncation, and each
gate replaced by its mean (real gates vary per token, and capacity drops tokens).
Through the GELU it is the reference's approximation; `refit.py` fits the output
layers to the MoE's actual outputs, and distillation (`distill.py`) trains the whole.
"""
from __future__ import annotations

import heapq
from collections.abc import Mapping

import numpy as np

from ringmoe.compress.extraction import Path, build, flat_params
from ringmoe.compress.pruning import block_prefixes
from ringmoe.compress.statistics import shares
from ringmoe.model.ringmoe import RingMoE


def apportion(budget: int, weights, caps) -> list[int]:
    """Integers r_i <= caps[i] summing to min(budget, sum of caps with weight > 0),
    proportional to weights (D'Hondt: each unit to the largest w_i / (r_i + 1))."""
    r = [0] * len(weights)
    heap = [(-w, i) for i, w in enumerate(weights) if w > 0 and caps[i] > 0]
    heapq.heapify(heap)
    for _ in range(budget):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        r[i] += 1
        if r[i] < caps[i]:
            heapq.heappush(heap, (-weights[i] / (r[i] + 1), i))
    return r


def _experts(params, prefix, modality, layer, statistics):
    """[(group, w_in (D,F), b_in (F,), w_out (F,D), b_out (D,), mean gate)] of one block."""
    ffn = prefix + ("ffn",)
    routed = {"modal": ffn + ("modal_experts", modality), "collaborative": ffn + ("collaborative_experts",)}
    out = []
    for group, base in routed.items():
        if base + ("router", "kernel") not in params:
            continue
        gates = shares(statistics, modality, group, "gate_mass")[layer]
        w_in, b_in, w_out, b_out = (params[base + ("experts", n)] for n in ("w_in", "b_in", "w_out", "b_out"))
        out += [(group, w_in[e], b_in[e], w_out[e], b_out[e], float(gates[e])) for e in range(len(gates))]
    shared = ffn + ("shared_expert",)
    if shared + ("fc1", "kernel") in params:
        out.append(("shared", params[shared + ("fc1", "kernel")], params[shared + ("fc1", "bias")],
                    params[shared + ("fc2", "kernel")], params[shared + ("fc2", "bias")], 1.0))
    return out


def merge_block(experts, hidden: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    """One dense FFN {fc1_kernel, fc1_bias, fc2_kernel, fc2_bias} of width `hidden` from a
    block's experts, and per expert {group, weight, rank, energy kept}."""
    groups = list(dict.fromkeys(e[0] for e in experts))
    budgets = apportion(hidden, [1.0] * len(groups), [hidden] * len(groups))   # F / N per group
    dim = experts[0][1].shape[0]
    ranks = [0] * len(experts)
    for group, budget in zip(groups, budgets):
        members = [i for i, e in enumerate(experts) if e[0] == group]
        caps = [min(experts[i][1].shape[1], 2 * dim) for i in members]
        for i, r in zip(members, apportion(budget, [experts[i][5] for i in members], caps)):
            ranks[i] = r
    w1, b1, w2, report = [], [], [], []
    b2 = np.zeros(dim, np.float64)
    for (group, w_in, b_in, w_out, b_out, weight), rank in zip(experts, ranks):
        b2 += weight * b_out
        if rank == w_in.shape[1]:   # the whole expert fits: keep its own hidden units, exactly
            p, energy = np.eye(rank), 1.0
        else:
            stacked = np.concatenate([w_in.T, weight * w_out], axis=1).astype(np.float64)   # (F_e, 2D)
            u, s, _ = np.linalg.svd(stacked, full_matrices=False)
            p = u[:, :rank]
            energy = float(np.sum(s[:rank] ** 2) / max(np.sum(s ** 2), 1e-30))
        w1.append(w_in @ p)
        b1.append(b_in @ p)
        w2.append(p.T @ (weight * w_out))
        report.append({"group": group, "weight": weight, "rank": rank, "energy_kept": energy})
    pad = hidden - sum(ranks)   # only when the groups' experts cannot fill their share
    w1.append(np.zeros((dim, pad)))
    b1.append(np.zeros(pad))
    w2.append(np.zeros((pad, dim)))
    dense = {"fc1_kernel": np.concatenate(w1, 1), "fc1_bias": np.concatenate(b1),
             "fc2_kernel": np.concatenate(w2, 0), "fc2_bias": b2}
    return {k: v.astype(np.float32) for k, v in dense.items()}, report


def merge_experts(params: Mapping[Path, np.ndarray], dense_config, statistics: dict,
                  modality: str) -> tuple[RingMoE, list[list[dict]]]:
    """The dense model of `dense_config` from the pruned MoE's parameters and its routing
    `statistics` on `modality`. Returns (model, per block the merge report)."""
    out = {path: v for path, v in params.items() if "ffn" not in path}
    reports = []
    for layer, prefix in enumerate(block_prefixes(params)):
        experts = _experts(params, prefix, modality, layer, statistics)
        dense, report = merge_block(experts, hidden=experts[0][1].shape[1])   # every expert is F wide
        ffn = prefix + ("ffn", "ffn")
        out[ffn + ("fc1", "kernel")], out[ffn + ("fc1", "bias")] = dense["fc1_kernel"], dense["fc1_bias"]
        out[ffn + ("fc2", "kernel")], out[ffn + ("fc2", "bias")] = dense["fc2_kernel"], dense["fc2_bias"]
        reports.append(report)
    return build(dense_config, out), reports


def svd_merge(teacher: RingMoE, teacher_config, dense_config, statistics: dict, modality: str, data_dir: str,
              *, max_images: int) -> tuple[RingMoE, dict]:
    """`merge_experts` with the merge registry's signature (`run.MERGES`): the weights and the
    routing statistics are all it uses. Returns (model, {"ranks": per block the merge report})."""
    del teacher_config, data_dir, max_images
    model, ranks = merge_experts(flat_params(teacher), dense_config, statistics, modality)
    return model, {"ranks": ranks}
