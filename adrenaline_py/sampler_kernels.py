"""The sampler's CUDA kernels: the top-k / top-p threshold found without sorting, and Gumbel-max in
one pass over the scores.

Threshold. A row keeps the tokens scoring at least the last token a descending sort would keep:
its first ``k`` entries, cut further to the shortest prefix whose mass (softmax over those ``k``)
reaches ``top_p`` (`adrenaline_py.sampler`). Both rules are monotone in the cut: with each logit
mapped to an integer key that orders as the values do (its 16 bits for bf16, else the fp32
value's 32), "keep the keys >= u" satisfies the rule for every u above some u0, and u0 is a key
present in the row. So u0 is found by a radix search, 4 bits per pass from the top (4 passes for
bf16, 8 for fp32), with no sort:

- a pass's programs each take one (row, chunk of the vocabulary) and histogram the keys still in
  the row's search range into 16 buckets (their count for top-k, their mass exp(s - max) for
  top-p);
- a one-program-per-row kernel then sums the chunks' histograms in a fixed order, finds the lowest
  bucket where the rule holds, and narrows the range to it.

The vocabulary's chunking does not depend on the batch, and no sum uses atomics, so a row's
threshold is the same whatever else is in its batch (the sampler's reproducibility). Blocks with no
key left in range skip the histogram, so late passes cost one read of the logits. The logits are
read in their own dtype (no [B, V] fp32 copy); the Gumbel-max kernel divides them by the
temperature, rounded as torch divides, so its scores are the torch path's.
"""

from __future__ import annotations

import torch

from adrenaline_py.triton_support import LOG2E, next_pow2, tl, triton

RADIX_BITS = 4
BUCKETS = 1 << RADIX_BITS
CHUNK = 4096   # vocabulary entries per program of a search pass (fixed: the sums' order never varies)
BLOCK = 128    # entries per loop iteration inside a program
# Smaller vocabularies sort faster than they search (H200, 64-256 rows: 32,000 entries sort in
# 0.76-1.07 ms against the search's 1.07-1.09; 128,256 in 1.22-3.70 against 0.96-1.12;
# docs/performance.md, eighth run): `sampler` sorts below this and searches from it.
RADIX_MIN_VOCAB = 65_536

if triton is not None:

    @triton.jit
    def _order_key(x, KEY_BITS: tl.constexpr):
        """The raw logit's key (uint32 in [0, 2**KEY_BITS)): keys order as the values do; -0 is +0.
        KEY_BITS 16 reads bf16 logits' own bits (so 4 passes search them), 32 the fp32 value's."""
        if KEY_BITS == 16:
            b = x.to(tl.uint16, bitcast=True).to(tl.uint32)
            b = tl.where(b == 0x8000, 0, b)
            return tl.where(b >= 0x8000, 0xFFFF - b, b + 0x8000)
        else:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            b = tl.where(b == 0x80000000, 0, b)
            return tl.where(b >= 0x80000000, 0xFFFFFFFF - b, b + 0x80000000)

    @triton.jit
    def _chunk_max_kernel(x_ptr, stride, out_ptr, vocab, chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            best = tl.maximum(best, x)
        tl.store(out_ptr + row * chunks + c, tl.max(best, axis=0))

    @triton.jit
    def _histogram_kernel(x_ptr, stride, temp_ptr, floor_ptr, max_ptr, scale_ptr, lo_ptr, cut_ptr, cnt_ptr,
                          mass_ptr, total_ptr, vocab, chunks, shift,
                          KEY_BITS: tl.constexpr, MASS: tl.constexpr, TOTAL: tl.constexpr, MIN_P: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr, BUCKETS: tl.constexpr):
        """One (row, chunk): the histogram of the keys in the row's search range, 16 buckets of
        2**shift keys from lo up: their count (top-k search) or their mass (top-p search)."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        lo = tl.load(lo_ptr + row).to(tl.uint32)
        bins = tl.arange(0, BUCKETS)[None, :]
        if MASS:
            m = tl.load(max_ptr + row)
            scale = tl.load(scale_ptr + row)   # log2(e) / temperature: mass = 2 ** ((x - max) * scale)
        if MIN_P:
            temp = tl.load(temp_ptr + row)
            floor = tl.load(floor_ptr + row)
        # Entries are [BLOCK, 1] columns: they broadcast against the buckets without a layout change
        # (as [BLOCK] rows they ran ~3x slower, eighth run). Per-thread partial histograms, reduced
        # once at the end (in a fixed order).
        lanes = tl.arange(0, BLOCK)[:, None]
        total = tl.zeros([BLOCK, 1], tl.float32)
        if TOTAL:
            cut = tl.load(cut_ptr + row)   # the top-k cut's key (-1: none): the mass above it
        acc_n = tl.zeros([BLOCK, BUCKETS], tl.int32)
        acc_m = tl.zeros([BLOCK, BUCKETS], tl.float32)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + lanes
            inside = offs < vocab
            x = tl.load(x_ptr + row * stride + offs, mask=inside, other=0.0)
            key = _order_key(x, KEY_BITS)
            xf = x.to(tl.float32)
            if MIN_P:   # under the floor (in scores x / T, rounded as torch divides): -inf's key, no mass
                dropped = tl.math.div_rn(xf, temp) < floor
                key = tl.where(dropped, 0xFFFF - 0xFF80 if KEY_BITS == 16 else 0xFFFFFFFF - 0xFF800000, key)
            in_range = inside & (key >= lo) & (((key - lo) >> shift) < BUCKETS)
            if MASS:
                e = tl.where(inside, tl.exp2((xf - m) * scale), 0.0)
                if MIN_P:
                    e = tl.where(dropped, 0.0, e)
                if TOTAL:
                    total += tl.where(key.to(tl.int64) > cut, e, 0.0)
            if tl.max(in_range.to(tl.int32)) > 0:   # late passes: most blocks hold no key in range
                hit = in_range & (((key - lo) >> shift) == bins)
                if MASS:
                    acc_m += tl.where(hit, e, 0.0)
                else:
                    acc_n += hit.to(tl.int32)
        out = (row * chunks + c) * BUCKETS + tl.arange(0, BUCKETS)
        if MASS:
            tl.store(mass_ptr + out, tl.sum(acc_m, axis=0))
        else:
            tl.store(cnt_ptr + out, tl.sum(acc_n, axis=0))
        if TOTAL:
            tl.store(total_ptr + row * chunks + c, tl.sum(total))

    @triton.jit
    def _select_kernel(cnt_ptr, mass_ptr, total_ptr, lo_ptr, above_n_ptr, above_m_ptr, cut_ptr, cut_above_ptr,
                       k_ptr, top_p_ptr, z_ptr, max_ptr, scale_ptr, chunks, width,
                       MASS: tl.constexpr, FIRST: tl.constexpr, HAS_CUT: tl.constexpr, KEY_BITS: tl.constexpr,
                       CBLOCK: tl.constexpr, BUCKETS: tl.constexpr):
        row = tl.program_id(0)
        bins = tl.arange(0, BUCKETS)
        cs = tl.arange(0, CBLOCK)
        where = (row * chunks + cs[:, None]) * BUCKETS + bins[None, :]
        valid = cs[:, None] < chunks
        lo = tl.load(lo_ptr + row)
        # what lies above bucket j: the range's higher buckets plus what was above the range already
        higher = bins[None, :] > bins[:, None]   # [j, b]: bucket b is above bucket j
        if MASS:
            mass = tl.sum(tl.load(mass_ptr + where, mask=valid, other=0.0), axis=0)
            above_m = tl.load(above_m_ptr + row)
            m_j = above_m + tl.sum(tl.where(higher, mass[None, :], 0.0), axis=1)
            if FIRST:
                z = tl.sum(tl.load(total_ptr + row * chunks + cs, mask=cs < chunks, other=0.0), axis=0)
                if HAS_CUT:
                    cut = tl.load(cut_ptr + row)
                    if cut >= 0:   # the top-k cut's own value fills the top k up (ties: only as many as fit)
                        k = tl.load(k_ptr + row)
                        tie = tl.exp2((_key_value(cut, KEY_BITS) - tl.load(max_ptr + row)) * tl.load(scale_ptr + row))
                        z += (k - tl.load(cut_above_ptr + row)).to(tl.float32) * tie
                tl.store(z_ptr + row, z)
            else:
                z = tl.load(z_ptr + row)
            top_p = tl.load(top_p_ptr + row)
            holds = m_j < tl.where(top_p >= 1.0, float("inf"), top_p * z)   # top-p 1: no cut
        else:
            cnt = tl.sum(tl.load(cnt_ptr + where, mask=valid, other=0), axis=0).to(tl.int64)
            n_j = tl.load(above_n_ptr + row) + tl.sum(tl.where(higher, cnt[None, :], 0), axis=1)
            holds = n_j < tl.load(k_ptr + row)
        j = tl.min(tl.where(holds, bins, BUCKETS - 1), axis=0)
        at = bins == j
        tl.store(lo_ptr + row, lo + j.to(tl.int64) * width)
        if MASS:
            tl.store(above_m_ptr + row, tl.sum(tl.where(at, m_j, 0.0), axis=0))
        else:
            tl.store(above_n_ptr + row, tl.sum(tl.where(at, n_j, 0), axis=0))

    @triton.jit
    def _key_value(key, KEY_BITS: tl.constexpr):
        """The logit (fp32) whose key is ``key`` (inverse of `_order_key`)."""
        if KEY_BITS == 16:
            b = tl.where(key >= 0x8000, key - 0x8000, 0xFFFF - key)
            return (b << 16).to(tl.uint32).to(tl.float32, bitcast=True)   # bf16 is fp32's high half
        else:
            b = tl.where(key >= 0x80000000, key - 0x80000000, 0xFFFFFFFF - key)
            return b.to(tl.uint32).to(tl.float32, bitcast=True)

    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32 (multiplications wrap mod 2**32, as `sampler._hash32` computes them in int64)
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(x_ptr, stride, temp_ptr, keys_ptr, threshold_ptr, best_ptr, best_at_ptr, vocab, chunks,
                              HAS_TEMP: tl.constexpr, HAS_THRESHOLD: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCK: tl.constexpr):
        """One (row, chunk): the chunk's best s + noise and where it is (the first of equal ones)."""
        row = tl.program_id(0)
        c = tl.program_id(1)
        key = tl.load(keys_ptr + row).to(tl.uint32)
        if HAS_TEMP:
            temp = tl.load(temp_ptr + row)
        if HAS_THRESHOLD:
            threshold = tl.load(threshold_ptr + row)
        best = tl.full((), float("-inf"), tl.float32)
        best_at = tl.full((), 0, tl.int64)
        for start in range(0, CHUNK, BLOCK):
            offs = c * CHUNK + start + tl.arange(0, BLOCK)
            inside = offs < vocab
            s = tl.load(x_ptr + row * stride + offs, mask=inside, other=float("-inf")).to(tl.float32)
            if HAS_TEMP:
                s = tl.math.div_rn(s, temp)   # rounded as torch divides
            token = _mix32(offs.to(tl.uint32) * 0x2545F491)
            bits = _mix32(key ^ token)
            u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)   # as sampler.uniform_of
            v = s + -tl.log(-tl.log(u))
            if HAS_THRESHOLD:
                inside = inside & (s >= threshold)
            v = tl.where(inside, v, float("-inf"))
            m = tl.max(v, axis=0)
            at = tl.argmax(v, axis=0).to(tl.int64) + c * CHUNK + start
            take = m > best  # strictly: the first maximum wins, as torch.argmax
            best_at = tl.where(take, at, best_at)
            best = tl.where(take, m, best)
        tl.store(best_ptr + row * chunks + c, best)
        tl.store(best_at_ptr + row * chunks + c, best_at)


def gumbel_argmax(scores: torch.Tensor, keys: torch.Tensor, threshold: torch.Tensor | None = None,
                  temps: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(s + Gumbel noise) per row over the tokens with s >= ``threshold`` [S] (all when None),
    where s = scores / ``temps`` [S] (fp32, rounded as torch divides; scores as they are when None):
    the noise of `sampler.gumbel_noise`, made in the kernel. Each (row, chunk) finds its best, then
    the first best chunk wins (torch.argmax's first maximum)."""
    scores = scores.contiguous()
    rows, vocab = scores.shape
    chunks = triton.cdiv(vocab, CHUNK)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=scores.device)
    best_at = torch.empty(rows, chunks, dtype=torch.int64, device=scores.device)
    _gumbel_argmax_kernel[(rows, chunks)](
        scores, scores.stride(0), temps if temps is not None else scores, keys,
        threshold if threshold is not None else scores, best, best_at, vocab, chunks,
        HAS_TEMP=temps is not None, HAS_THRESHOLD=threshold is not None, CHUNK=CHUNK, BLOCK=1024, num_warps=4)
    return best_at.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


def cut_threshold(logits: torch.Tensor, temps: torch.Tensor, log_min_p: torch.Tensor | None,
                  k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """[S] fp32: each row's lowest kept score, for the scores s = logits / temps ([S, V] any float
    dtype, [S] fp32) with those under the min-p floor max(s) + ``log_min_p`` dropped (None: no
    min-p): the k-th highest s (``k`` [S] int64; None: no top-k), raised to the last s of the
    shortest descending prefix whose mass, softmax over the top k, reaches ``top_p`` ([S] fp32;
    None: no top-p), and never below the floor. The threshold a descending sort gives
    (`sampler.sort_threshold`), found by the radix search of this module's docstring.

    The search runs on the logits themselves: dividing by a positive temperature keeps their order
    (ties it creates are kept together, as the sort keeps them), so only the mass and the min-p
    floor need the temperature."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    dev = logits.device
    key_bits = 16 if logits.dtype == torch.bfloat16 else 32
    chunks = triton.cdiv(vocab, CHUNK)
    grid = (rows, chunks)
    row_max = torch.empty(rows, chunks, dtype=torch.float32, device=dev)
    _chunk_max_kernel[grid](logits, logits.stride(0), row_max, vocab, chunks, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=4)
    row_max = row_max.amax(dim=1)
    floor = None
    if log_min_p is not None:
        floor = row_max / temps + log_min_p   # as the torch path: max(s) + log(min_p), in fp32
    if k is None and top_p is None:
        return floor if floor is not None else torch.full((rows,), float("-inf"), device=dev)
    scale = LOG2E / temps
    cnt = torch.empty(rows, chunks, BUCKETS, dtype=torch.int32, device=dev)
    mass = torch.empty(rows, chunks, BUCKETS, dtype=torch.float32, device=dev)
    total = torch.empty(rows, chunks, dtype=torch.float32, device=dev)
    z = torch.empty(rows, dtype=torch.float32, device=dev)
    cut = torch.full((rows,), -1, dtype=torch.int64, device=dev)   # the top-k search's key (-1: none)
    cut_above = torch.zeros(rows, dtype=torch.int64, device=dev)   # entries above it
    cblock = next_pow2(chunks)
    key = cut
    for phase in [p for p, on in (("k", k is not None), ("p", top_p is not None)) if on]:
        mass_phase = phase == "p"
        lo = torch.zeros(rows, dtype=torch.int64, device=dev)
        above_n = torch.zeros(rows, dtype=torch.int64, device=dev)
        above_m = torch.zeros(rows, dtype=torch.float32, device=dev)
        for i in range(key_bits // RADIX_BITS):
            shift = key_bits - RADIX_BITS * (i + 1)   # this pass's bucket: the key's bits from `shift` up
            _histogram_kernel[grid](
                logits, logits.stride(0), temps, floor if floor is not None else temps, row_max, scale, lo, cut,
                cnt, mass, total, vocab, chunks, shift, KEY_BITS=key_bits, MASS=mass_phase,
                TOTAL=mass_phase and i == 0, MIN_P=floor is not None, CHUNK=CHUNK, BLOCK=BLOCK, BUCKETS=BUCKETS,
                num_warps=4)
            _select_kernel[(rows,)](
                cnt, mass, total, lo, above_n, above_m, cut, cut_above, k if k is not None else lo,
                top_p if top_p is not None else above_m, z, row_max, scale, chunks, 1 << shift,
                MASS=mass_phase, FIRST=i == 0, HAS_CUT=k is not None, KEY_BITS=key_bits, CBLOCK=cblock,
                BUCKETS=BUCKETS, num_warps=1)
        key = torch.maximum(key, lo)
        if phase == "k":
            cut, cut_above = lo, above_n
    # the key back to its logit, then to a score; keys below -inf's are NaNs (nothing was cut)
    if key_bits == 16:
        key = key.clamp(min=0xFFFF - 0xFF80)
        bits = torch.where(key >= 0x8000, key - 0x8000, 0xFFFF - key) << 16
    else:
        key = key.clamp(min=0xFFFFFFFF - 0xFF800000)
        bits = torch.where(key >= 0x80000000, key - 0x80000000, 0xFFFFFFFF - key)
    value = bits.to(torch.int32).view(torch.float32)   # int64 -> int32 keeps the low 32 bits
    threshold = value / temps
    return threshold if floor is None else torch.maximum(threshold, floor)
