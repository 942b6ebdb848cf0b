"""The sampler's CUDA kernels: the top-k / top-p threshold found without sorting, and Gumbel-max in
one pass over the scores.

Threshold. A row keeps the tokens scoring at least the last token a descending sort would keep:
its first ``k`` entries, cut further to the shortest prefix whose mass (softmax over those ``k``)
reaches ``top_p`` (`adrenaline_py.sampler`). Both rules are monotone in the cut: with each score
mapped to a 32-bit key that orders as the floats do, "keep the keys >= u" satisfies the rule for
every u above some u0, and u0 is a key present in the row. So u0 is found by a radix search, 4 bits
per pass from the top, 8 passes, with no sort:

- a pass's programs each take one (row, chunk of the vocabulary) and histogram the keys still in
  the row's search range into 16 buckets (count, and mass exp(s - max) for top-p);
- a one-program-per-row kernel then sums the chunks' histograms in a fixed order, finds the lowest
  bucket where the rule holds, and narrows the range to it.

The vocabulary's chunking does not depend on the batch, and no sum uses atomics, so a row's
threshold is the same whatever else is in its batch (the sampler's reproducibility). Blocks with no
key left in range skip the histogram, so late passes cost one read of the logits. The logits are
read in their own dtype and divided by the temperature in the kernels (rounded as torch's division),
so no [B, V] fp32 copy is made.
"""

from __future__ import annotations

import torch

from adrenaline_py.triton_support import next_pow2, tl, triton

RADIX_BITS = 4
BUCKETS = 1 << RADIX_BITS
PASSES = 32 // RADIX_BITS
CHUNK = 4096   # vocabulary entries per program of a search pass (fixed: the sums' order never varies)
BLOCK = 1024   # entries per loop iteration inside a program
KEY_OF_MINUS_INF = 0x007FFFFF

if triton is not None:

    @triton.jit
    def _load_scores(x_ptr, offs, inside, temp, floor):
        """fp32 scores x / temperature (IEEE division, as torch), -inf under the min-p floor; -0 -> +0."""
        x = tl.load(x_ptr + offs, mask=inside, other=float("-inf")).to(tl.float32)
        s = tl.math.div_rn(x, temp) + 0.0
        return tl.where(s < floor, float("-inf"), s)

    @triton.jit
    def _order_key(s):
        """A float's 32-bit key (int64 in [0, 2**32)): keys order as the floats do."""
        b = s.to(tl.uint32, bitcast=True).to(tl.int64)
        return tl.where(b >= 2147483648, 4294967295 - b, b + 2147483648)

    @triton.jit
    def _key_value(key):
        """The float whose key is ``key`` (inverse of `_order_key`)."""
        b = tl.where(key >= 2147483648, key - 2147483648, 4294967295 - key)
        return b.to(tl.uint32).to(tl.float32, bitcast=True)

    @triton.jit
    def _chunk_max_kernel(x_ptr, stride, temp_ptr, out_ptr, vocab, chunks,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        temp = tl.load(temp_ptr + row)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + tl.arange(0, BLOCK)
            inside = offs < vocab
            s = _load_scores(x_ptr + row * stride, offs, inside, temp, float("-inf"))
            best = tl.maximum(best, tl.where(inside, s, float("-inf")))
        tl.store(out_ptr + row * chunks + c, tl.max(best, axis=0))

    @triton.jit
    def _histogram_kernel(x_ptr, stride, temp_ptr, floor_ptr, max_ptr, lo_ptr, cut_ptr, cnt_ptr, mass_ptr,
                          total_ptr, vocab, chunks, width,
                          MASS: tl.constexpr, TOTAL: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                          BUCKETS: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        temp = tl.load(temp_ptr + row)
        floor = tl.load(floor_ptr + row)
        m = tl.load(max_ptr + row)
        lo = tl.load(lo_ptr + row)
        bins = tl.arange(0, BUCKETS)
        cnt = tl.zeros([BUCKETS], tl.int32)
        mass = tl.zeros([BUCKETS], tl.float32)
        if TOTAL:
            cut = tl.load(cut_ptr + row)   # the top-k cut's key (-1: none): total mass above it
            total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + tl.arange(0, BLOCK)
            inside = offs < vocab
            s = _load_scores(x_ptr + row * stride, offs, inside, temp, floor)
            key = _order_key(s)
            rel = key - lo
            bucket = rel // width   # keys in [lo, lo + BUCKETS * width) are still in the search range
            in_range = inside & (rel >= 0) & (bucket < BUCKETS)
            if MASS:
                e = tl.where(inside, tl.exp(s - m), 0.0)
                if TOTAL:
                    total += tl.where(key > cut, e, 0.0)
            if tl.max(in_range.to(tl.int32), axis=0) > 0:
                hit = in_range[:, None] & (bucket[:, None] == bins[None, :])
                cnt += tl.sum(hit.to(tl.int32), axis=0)
                if MASS:
                    mass += tl.sum(tl.where(hit, e[:, None], 0.0), axis=0)
        out = (row * chunks + c) * BUCKETS + bins
        tl.store(cnt_ptr + out, cnt)
        if MASS:
            tl.store(mass_ptr + out, mass)
        if TOTAL:
            tl.store(total_ptr + row * chunks + c, tl.sum(total, axis=0))

    @triton.jit
    def _select_kernel(cnt_ptr, mass_ptr, total_ptr, lo_ptr, above_n_ptr, above_m_ptr, cut_ptr, cut_above_ptr,
                       k_ptr, top_p_ptr, z_ptr, max_ptr, floor_ptr, out_ptr, chunks, width,
                       MASS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, HAS_CUT: tl.constexpr,
                       CBLOCK: tl.constexpr, BUCKETS: tl.constexpr, KEY_OF_MINUS_INF: tl.constexpr):
        row = tl.program_id(0)
        bins = tl.arange(0, BUCKETS)
        cs = tl.arange(0, CBLOCK)
        where = (row * chunks + cs[:, None]) * BUCKETS + bins[None, :]
        valid = cs[:, None] < chunks
        cnt = tl.sum(tl.load(cnt_ptr + where, mask=valid, other=0), axis=0).to(tl.int64)
        lo = tl.load(lo_ptr + row)
        above_n = tl.load(above_n_ptr + row)
        # what lies above bucket j: the range's higher buckets plus what was above the range already
        higher = bins[None, :] > bins[:, None]   # [j, b]: bucket b is above bucket j
        n_j = above_n + tl.sum(tl.where(higher, cnt[None, :], 0), axis=1)
        if MASS:
            mass = tl.sum(tl.load(mass_ptr + where, mask=valid, other=0.0), axis=0)
            above_m = tl.load(above_m_ptr + row)
            m_j = above_m + tl.sum(tl.where(higher, mass[None, :], 0.0), axis=1)
            if FIRST:
                z = tl.sum(tl.load(total_ptr + row * chunks + cs, mask=cs < chunks, other=0.0), axis=0)
                if HAS_CUT:
                    cut = tl.load(cut_ptr + row)
                    if cut >= 0:   # the top-k cut's own key fills the top k up (ties: only as many as fit)
                        k = tl.load(k_ptr + row)
                        tie = tl.exp(_key_value(cut) - tl.load(max_ptr + row))
                        z += (k - tl.load(cut_above_ptr + row)).to(tl.float32) * tie
                tl.store(z_ptr + row, z)
            else:
                z = tl.load(z_ptr + row)
            top_p = tl.load(top_p_ptr + row)
            holds = m_j < tl.where(top_p >= 1.0, float("inf"), top_p * z)   # top-p 1: no cut
        else:
            holds = n_j < tl.load(k_ptr + row)
        j = tl.min(tl.where(holds, bins, BUCKETS - 1), axis=0)
        at = bins == j
        lo = lo + j.to(tl.int64) * width
        tl.store(lo_ptr + row, lo)
        tl.store(above_n_ptr + row, tl.sum(tl.where(at, n_j, 0), axis=0))
        if MASS:
            tl.store(above_m_ptr + row, tl.sum(tl.where(at, m_j, 0.0), axis=0))
        if LAST:
            key = tl.maximum(lo, KEY_OF_MINUS_INF)   # nothing cut: -inf (keys below it are NaNs)
            if HAS_CUT:
                key = tl.maximum(key, tl.load(cut_ptr + row))
            tl.store(out_ptr + row, tl.maximum(_key_value(key), tl.load(floor_ptr + row)))

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32 (multiplications wrap mod 2**32, as `sampler._hash32` computes them in int64)
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(x_ptr, stride, temp_ptr, keys_ptr, threshold_ptr, out_ptr, vocab,
                              HAS_TEMP: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        key = tl.load(keys_ptr + row).to(tl.uint32)
        temp = 1.0
        if HAS_TEMP:
            temp = tl.load(temp_ptr + row)
        if HAS_THRESHOLD:
            threshold = tl.load(threshold_ptr + row)
        best = tl.full((), float("-inf"), tl.float32)
        best_at = tl.full((), 0, tl.int64)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < vocab
            if HAS_TEMP:
                s = _load_scores(x_ptr + row * stride, offs, inside, temp, float("-inf"))
            else:
                s = tl.load(x_ptr + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
            token = _mix32(offs.to(tl.uint32) * 0x2545F491)
            bits = _mix32(key ^ token)
            u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            v = s + -tl.log(-tl.log(u))
            if HAS_THRESHOLD:
                inside = inside & (s >= threshold)
            v = tl.where(inside, v, float("-inf"))
            m = tl.max(v, axis=0)
            at = tl.argmax(v, axis=0).to(tl.int64) + start
            take = m > best  # strictly: the first maximum wins, as torch.argmax
            best_at = tl.where(take, at, best_at)
            best = tl.where(take, m, best)
        tl.store(out_ptr + row, best_at)


def gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor, threshold: torch.Tensor | None = None,
                  temps: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(s + Gumbel noise) per row over the tokens with s >= ``threshold`` [S] (all when None),
    where s = scores / ``temps`` [S] (fp32, rounded as torch divides; scores as they are when None):
    the noise of `sampler.gumbel_noise`, made in the kernel."""
    scores = scores.contiguous()
    out = torch.empty(scores.shape[0], dtype=torch.int64, device=scores.device)
    _gumbel_argmax_kernel[(scores.shape[0],)](
        scores, scores.stride(0), temps if temps is not None else scores, keys,
        threshold if threshold is not None else scores, out, scores.shape[1],
        HAS_TEMP=temps is not None, HAS_THRESHOLD=threshold is not None, BLOCK=2048, num_warps=8)
    return out


def cut_threshold(logits: torch.Tensor, temps: torch.Tensor, log_min_p: torch.Tensor, k: torch.Tensor | None,
                  top_p: torch.Tensor | None) -> torch.Tensor:
    """[S] fp32: each row's lowest kept score, for the scores s = logits / temps ([S, V] any float
    dtype, [S] fp32) with those under the min-p floor max(s) + ``log_min_p`` dropped: the k-th
    highest s (``k`` [S] int64; None: no top-k), raised to the last s of the shortest descending
    prefix whose mass, softmax over the top k, reaches ``top_p`` ([S] fp32; None: no top-p), and
    never below the floor. The threshold a descending sort gives (`sampler._sample_rows`), found by
    the radix search of this module's docstring."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    dev = logits.device
    chunks = triton.cdiv(vocab, CHUNK)
    grid = (rows, chunks)
    row_max = torch.empty(rows, chunks, dtype=torch.float32, device=dev)
    _chunk_max_kernel[grid](logits, logits.stride(0), temps, row_max, vocab, chunks, CHUNK=CHUNK, BLOCK=BLOCK,
                            num_warps=4)
    row_max = row_max.amax(dim=1)
    floor = row_max + log_min_p   # as the torch path: max(s) + log(min_p), in fp32
    if k is None and top_p is None:
        return floor
    cnt = torch.empty(rows, chunks, BUCKETS, dtype=torch.int32, device=dev)
    mass = torch.empty(rows, chunks, BUCKETS, dtype=torch.float32, device=dev)
    total = torch.empty(rows, chunks, dtype=torch.float32, device=dev)
    z = torch.empty(rows, dtype=torch.float32, device=dev)
    out = torch.empty(rows, dtype=torch.float32, device=dev)
    cut = torch.full((rows,), -1, dtype=torch.int64, device=dev)   # the top-k search's key (-1: none)
    cut_above = torch.zeros(rows, dtype=torch.int64, device=dev)   # entries above it
    cblock = next_pow2(chunks)
    phases = [p for p, on in (("k", k is not None), ("p", top_p is not None)) if on]
    for phase in phases:
        mass_phase = phase == "p"
        lo = torch.zeros(rows, dtype=torch.int64, device=dev)
        above_n = torch.zeros(rows, dtype=torch.int64, device=dev)
        above_m = torch.zeros(rows, dtype=torch.float32, device=dev)
        for i in range(PASSES):
            width = 1 << (32 - RADIX_BITS * (i + 1))   # keys per bucket in this pass
            first, last = i == 0, i == PASSES - 1
            _histogram_kernel[grid](
                logits, logits.stride(0), temps, floor, row_max, lo, cut, cnt, mass, total, vocab, chunks, width,
                MASS=mass_phase, TOTAL=mass_phase and first, CHUNK=CHUNK, BLOCK=BLOCK, BUCKETS=BUCKETS,
                num_warps=4)
            _select_kernel[(rows,)](
                cnt, mass, total, lo, above_n, above_m, cut, cut_above, k if k is not None else lo,
                top_p if top_p is not None else above_m, z, row_max, floor, out, chunks, width,
                MASS=mass_phase, FIRST=first, LAST=last and phase == phases[-1], HAS_CUT=k is not None,
                CBLOCK=cblock, BUCKETS=BUCKETS, KEY_OF_MINUS_INF=KEY_OF_MINUS_INF, num_warps=1)
        if phase == "k":
            cut, cut_above = lo, above_n
    return out
