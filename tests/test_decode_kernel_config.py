"""The decode kernel's launch configuration by the number of (sequence, KV head) programs per SM
(H200 sweeps, docs/performance.md): split contexts below two per SM, 32-token tiles at 4 warps from
two to four, 32-token tiles at 2 warps from four, 64-token tiles at 4 warps for GQA from 24."""

import pytest

from adrenaline_py.attention.triton_decode import default_config


@pytest.mark.parametrize("batch, sms, block_n, warps, one_partition", [
    (32, 132, 64, 8, False),    # 256 programs < 2 x 132: the context is split, wide tiles, 8 warps
    (33, 132, 32, 4, True),     # 264 = 2 per SM: 32-token tiles, one partition per sequence
    (65, 132, 32, 4, True),     # 520 < 4 x 132
    (66, 132, 32, 2, True),     # 528 = 4 per SM: 2 warps
    (256, 132, 32, 2, True),    # 2048 < 24 x 132
    (396, 132, 64, 4, True),    # 3168 = 24 per SM (GQA): 64-token tiles, 4 warps
    (544, 132, 64, 4, True),
    (26, 104, 32, 4, True),     # under an MPS share the SMs the process gets set the bands: 208 = 2 x 104
    (52, 104, 32, 2, True),     # 416 = 4 x 104
    (312, 104, 64, 4, True),    # 2496 = 24 x 104
])
def test_gqa_tiles_follow_programs_per_sm(batch, sms, block_n, warps, one_partition):
    cfg = default_config(batch, num_kv_heads=8, group=4, head_dim=128, page=16, max_seq_len=2048, num_sms=sms)
    assert (cfg.block_n, cfg.num_warps) == (block_n, warps)
    assert (cfg.partition >= 2048) == one_partition
    assert cfg.partition % cfg.block_n == 0


@pytest.mark.parametrize("batch, block_n, warps", [
    (8, 64, 8),      # 256 programs < 2 x 132: split, wide tiles
    (12, 32, 4),     # 384: two to four per SM
    (17, 32, 2),     # 544: from four per SM, at any count for MHA
    (544, 32, 2),    # 17,408 = 132 per SM
])
def test_mha_tiles_follow_programs_per_sm(batch, block_n, warps):
    cfg = default_config(batch, num_kv_heads=32, group=1, head_dim=128, page=16, max_seq_len=2048, num_sms=132)
    assert (cfg.block_n, cfg.num_warps) == (block_n, warps)


@pytest.mark.parametrize("page, block_n, warps", [(16, 32, 2), (32, 32, 2), (64, 64, 4), (128, 128, 4)])
def test_tiles_are_never_shorter_than_a_page_and_longer_pages_keep_4_warps(page, block_n, warps):
    cfg = default_config(544, num_kv_heads=32, group=1, head_dim=128, page=page, max_seq_len=2048, num_sms=132)
    assert (cfg.block_n, cfg.num_warps) == (block_n, warps) and cfg.partition % block_n == 0
