"""Dense CRF mean-field inference in plain PyTorch (CPU or CUDA), reproducing pydensecrf2.

The Gaussian filters use the permutohedral lattice of Adams et al. (2010) exactly as Krähenbühl's densecrf
(`permutohedral.cpp`) builds it: same elevation, rounding, simplex ranks, barycentric weights, vertex numbering
(first use), blur (centre 1, neighbours 1/2 along each of the d+1 lattice directions, in order) and the
`1 / (1 + 2^-d)` slice factor. Splat, each blur direction and slice are sparse row operators built once per image
and applied with `embedding_bag(mode="sum", per_sample_weights=...)`: a fused gather + weighted sum over
contiguous (rows, classes) float32 matrices, the fastest sparse x dense product PyTorch has on CPU. The
NORMALIZE_SYMMETRIC factors and the Potts weight are folded into the splat and slice weights.

Mean field as `DenseCRF::inference`: U = -log(clip(p, 1e-5, 1)) (`pydensecrf.utils.unary_from_softmax`),
Q = softmax(-U), then `iterations` times Q = softmax(-U + sum_k w_k n_k K_k(n_k Q)) with n_k = 1 / sqrt(K_k 1):
Potts compatibility turns the filtered Q into -w K Q and inference subtracts it. K includes each pixel's own
contribution, as densecrf's lattice does (there is no self-term subtraction).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from deeplab.config import CrfConfig

# Clip of pydensecrf.utils.unary_from_softmax.
UNARY_CLIP = 1e-5
# CPU: classes are filtered in chunks whose largest buffer stays under glibc's 32 MiB dynamic mmap threshold,
# so freed buffers are reused instead of page-faulted in again each product; narrow rows also gather better.
CPU_CHUNK_BYTES = 24 * 2**20

# A sparse row operator (indices, offsets, weights): row r of `op @ x` is
# sum(weights[k] * x[indices[k]] for k in range(offsets[r], offsets[r + 1])); len(offsets) = rows + 1.
Operator = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def apply_op(op: Operator, x: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(op[0], x, op[1], mode="sum", per_sample_weights=op[2], include_last_offset=True)


def apply_chain(ops: list[Operator], x: torch.Tensor) -> torch.Tensor:
    for op in ops:
        x = apply_op(op, x)
    return x


def elevate(features: torch.Tensor) -> torch.Tensor:
    """(N, d) features -> (N, d+1) points on the hyperplane sum = 0, scaled for the expected filter std dev
    (float32 in densecrf's operation order, so roundings agree)."""
    n, d = features.shape
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]
    elevated = torch.empty(n, d + 1, dtype=torch.float32, device=features.device)
    sm = torch.zeros(n, dtype=torch.float32, device=features.device)
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        elevated[:, j] = sm - j * cf
        sm = sm + cf
    elevated[:, 0] = sm
    return elevated


def simplex(elevated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Enclosing simplex of each elevated point: (N, d+1, d) integer vertex keys (the first d coordinates
    determine the vertex) and (N, d+1) barycentric weights, both indexed by remainder as densecrf's
    offset_ / barycentric_."""
    n, d1 = elevated.shape
    d = d1 - 1
    idx = torch.arange(d1, device=elevated.device)
    down = float(np.float32(1.0 / d1))
    # Nearest remainder-0 point; torch.round is half-to-even like the SSE conversion densecrf uses.
    v = torch.round(elevated * down)
    rem0 = v * d1
    total = v.sum(1).long()
    # rank[i]: position of coordinate i in the descending order of elevated - rem0, ties broken by densecrf's
    # pairwise loop (pair i < j: diff_i < diff_j ranks i down, else j).
    diff = (elevated - rem0).T.contiguous()
    rank = torch.zeros(d1, n, dtype=torch.long, device=elevated.device)
    for i in range(d):
        for j in range(i + 1, d1):
            lower = diff[i] < diff[j]
            rank[i] += lower
            rank[j] += ~lower
    rank = rank.T
    # Bring the point back onto the plane (sum of the rounded coordinates != 0).
    rank += total[:, None]
    wrap = (rank > d).long() - (rank < 0).long()
    rank -= d1 * wrap
    rem0 -= d1 * wrap
    v = (elevated - rem0) * down
    by_rank = torch.empty_like(v).scatter_(1, rank, v)
    bary = torch.empty_like(v)
    bary[:, 1:] = by_rank[:, :d].flip(1) - by_rank[:, 1:].flip(1)
    bary[:, 0] = by_rank[:, d] + (1 - by_rank[:, 0])
    # Vertex of remainder r: rem0 plus the canonical simplex's vertex r permuted by rank.
    r = idx[None, :, None]
    keys = rem0.long()[:, None, :d] + r - d1 * (rank[:, None, :d] > d - r).long()
    return keys, bary


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


def lattice_operators(features: torch.Tensor) -> list[Operator]:
    """Operators [splat (M x N), blur_0 .. blur_d (M x M), slice (N x M)] of densecrf's unnormalised
    `Permutohedral::compute` for (B, N_b, d) float32 features: B images with separate lattices, N = B * N_b rows
    (image-major, pixels row-major)."""
    b, nb, d = features.shape
    d1 = d + 1
    n, n_entries = b * nb, b * nb * d1
    dev = features.device
    keys, bary = simplex(elevate(features.reshape(n, d)))
    keys = keys.reshape(n_entries, d)

    # Pack keys into one int64 (mixed radix); the d+1 margin keeps every blur neighbour inside its digit, so
    # neighbour keys are the packed key plus a constant and never carry into the image digit.
    lo = keys.amin(0) - d1
    span = (keys.amax(0) - lo + d1 + 1).tolist()
    if b * math.prod(span) >= 2**62:
        raise ValueError(f"lattice keys do not fit into int64 (spans {span}): features too spread out")
    strides = [math.prod(span[k + 1:]) for k in range(d)]
    packed = ((keys - lo) * torch.tensor(strides, device=dev)).sum(1)
    if b > 1:
        packed += torch.arange(b, device=dev).repeat_interleave(nb * d1) * math.prod(span)
    del keys

    # Deduplicate with one stable sort: groups of equal keys, entries ascending within each group.
    sorted_keys, perm = packed.sort(stable=True)
    starts_mask = torch.ones(n_entries, dtype=torch.bool, device=dev)
    starts_mask[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group = starts_mask.cumsum(0) - 1
    starts = starts_mask.nonzero()[:, 0]
    uniq = sorted_keys[starts]
    m = uniq.numel()
    counts = torch.diff(starts, append=starts.new_tensor([n_entries]))
    # Number vertices by first use, as densecrf's hash table does: neighbouring pixels then share nearby rows,
    # which keeps the gathers cache-friendly.
    order = perm[starts].argsort()
    renum = torch.empty_like(order)
    renum[order] = torch.arange(m, device=dev)
    vertex = torch.empty_like(perm)
    vertex[perm] = renum[group]

    # Splat = transpose of slice: row k gathers the entries of vertex k (old group order[k]) in pixel order.
    counts = counts[order]
    offsets = _offsets(counts)
    src = torch.arange(n_entries, device=dev) + (starts[order] - offsets[:-1]).repeat_interleave(
        counts, output_size=n_entries)
    entries = perm[src]
    ops = [(entries // d1, offsets, bary.reshape(-1)[entries])]

    # Blur neighbours along direction j: key - 1 on every coordinate except key_j + d (and the opposite).
    # Queries in sorted key order keep the binary searches cache-friendly; rows are reordered afterwards.
    deltas = torch.tensor([-sum(strides) + (d1 * strides[j] if j < d else 0) for j in range(d1)], device=dev)
    queries = torch.cat([uniq[None] + deltas[:, None], uniq[None] - deltas[:, None]])  # (2(d+1), M)
    pos = torch.searchsorted(uniq, queries).clamp_(max=m - 1)
    found = (uniq[pos] == queries)[:, order]
    nbr = renum[pos][:, order]
    # Fixed bags of 3 (centre 1, neighbours 1/2); a missing neighbour reads the centre row with weight 0.
    rows = torch.arange(m, device=dev)
    bag_offsets = torch.arange(0, 3 * m + 1, 3, device=dev)
    one = torch.ones(m, device=dev)
    for j in range(d1):
        cols = torch.stack([rows, torch.where(found[j], nbr[j], rows), torch.where(found[d1 + j], nbr[d1 + j], rows)], 1)
        weights = torch.stack([one, found[j] * 0.5, found[d1 + j] * 0.5], 1)
        ops.append((cols.reshape(-1), bag_offsets, weights.reshape(-1)))

    alpha = 1.0 / (1.0 + 2.0 ** -d)
    ops.append((vertex, torch.arange(0, n_entries + 1, d1, device=dev), (bary * alpha).reshape(-1)))
    return ops


def normalized_operators(features: torch.Tensor, weight: float) -> list[Operator]:
    """Operators of `weight * n * K(n * x)`, n = 1 / sqrt(K 1): densecrf's DIAG_KERNEL with
    NORMALIZE_SYMMETRIC, times the Potts weight."""
    ops = lattice_operators(features)
    ones = torch.ones(ops[-1][1].numel() - 1, 1, dtype=torch.float32, device=features.device)
    norm = (apply_chain(ops, ones)[:, 0] + 1e-20).rsqrt()
    (s_idx, s_off, s_w), (t_idx, t_off, t_w) = ops[0], ops[-1]
    d1 = t_off[1].item()
    return [(s_idx, s_off, s_w * norm[s_idx]), *ops[1:-1],
            (t_idx, t_off, t_w * (norm * weight).repeat_interleave(d1))]


def crf_features(rgb: torch.Tensor, cfg: CrfConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) image -> Gaussian (B, HW, 2) and bilateral (B, HW, 5) float32 features in densecrf's
    order: x (column), y (row), then the image channels as given."""
    b, h, w, _ = rgb.shape
    dev = rgb.device
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=dev),
                          torch.arange(w, dtype=torch.float32, device=dev), indexing="ij")
    xy = torch.stack([x.reshape(-1), y.reshape(-1)], 1)
    # densecrf divides by float32 standard deviations.
    pos_std, bi_std, rgb_std = (float(np.float32(s)) for s in (cfg.pos_xy_std, cfg.bi_xy_std, cfg.bi_rgb_std))
    gauss = (xy / pos_std).expand(b, -1, -1)
    bilateral = torch.cat([(xy / bi_std).expand(b, -1, -1), rgb.reshape(b, h * w, 3).float() / rgb_std], 2)
    return gauss, bilateral


def _softmax_(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """In-place softmax over the classes of a row-aligned list of (N, c_i) class chunks."""
    top = chunks[0].amax(1, keepdim=True)
    for x in chunks[1:]:
        torch.maximum(top, x.amax(1, keepdim=True), out=top)
    total = torch.zeros_like(top)
    for x in chunks:
        x.sub_(top).exp_()
        total += x.sum(1, keepdim=True)
    for x in chunks:
        x.div_(total)
    return chunks


def _chunk_size(n_classes: int, rows: int, device: torch.device) -> int:
    if device.type != "cpu":
        return n_classes
    return max(1, min(n_classes, CPU_CHUNK_BYTES // (4 * rows)))


def mean_field(probs: torch.Tensor, rgb: torch.Tensor | np.ndarray, cfg: CrfConfig,
               class_chunk: int | None = None) -> torch.Tensor:
    """(B, C, H, W) marginals Q after `cfg.iterations` mean-field iterations of pydensecrf2's dense CRF;
    arguments as `dense_crf_torch`. `class_chunk`: classes filtered at once (default: all on GPU, a cache- and
    allocator-friendly number on CPU)."""
    if probs.dim() == 3:
        probs = probs[None]
    dev = probs.device
    rgb = torch.as_tensor(np.ascontiguousarray(rgb) if isinstance(rgb, np.ndarray) else rgb, device=dev)
    if rgb.dim() == 3:
        rgb = rgb[None]
    b, c, h, w = probs.shape
    if tuple(rgb.shape) != (b, h, w, 3) or rgb.dtype != torch.uint8:
        raise ValueError(f"rgb must be uint8 {(b, h, w, 3)} for probs {tuple(probs.shape)}, got "
                         f"{rgb.dtype} {tuple(rgb.shape)}")
    gauss, bilateral = crf_features(rgb, cfg)
    chains = [normalized_operators(f, wt) for f, wt in ((gauss, cfg.pos_w), (bilateral, cfg.bi_w)) if wt != 0]
    rows = max([b * h * w] + [op[1].numel() for ops in chains for op in ops])
    chunk = class_chunk or _chunk_size(c, rows, dev)
    # -U = log(clip(p)), (N, chunk) blocks: pixels as rows, classes contiguous (densecrf's column-major (C, N)).
    pixels = probs.float().permute(0, 2, 3, 1).reshape(b * h * w, c)
    neg_unary = [pixels[:, a:a + chunk].clone(memory_format=torch.contiguous_format).clamp_(UNARY_CLIP, 1.0).log_()
                 for a in range(0, c, chunk)]
    q = _softmax_([u.clone() for u in neg_unary])
    for _ in range(cfg.iterations if chains else 0):
        logits = []
        for u, qk in zip(neg_unary, q, strict=True):
            x = apply_chain(chains[0], qk)
            for ops in chains[1:]:
                x += apply_chain(ops, qk)
            logits.append(x.add_(u))
        q = _softmax_(logits)
    return torch.cat(q, 1).view(b, h, w, c).permute(0, 3, 1, 2)


def dense_crf_torch(probs: torch.Tensor, rgb: torch.Tensor | np.ndarray, cfg: CrfConfig,
                    class_chunk: int | None = None) -> torch.Tensor:
    """Labels of pydensecrf2's dense CRF (Potts; Gaussian + bilateral kernels, `deeplab.crf.dense_crf`) in PyTorch.

    probs: (C, H, W) or (B, C, H, W) float softmax on any device; rgb: (H, W, 3) or (B, H, W, 3) uint8 image as
    given to pydensecrf's `addPairwiseBilateral` (numpy or tensor). Returns (H, W) or (B, H, W) labels on probs'
    device: uint8 when C <= 256, else int64.
    """
    labels = mean_field(probs, rgb, cfg, class_chunk).argmax(1)
    labels = labels.to(torch.uint8) if probs.shape[-3] <= 256 else labels
    return labels[0] if probs.dim() == 3 else labels
