"""The decode kernel's launch configuration by the number of (sequence, KV head) programs per SM
(H200 sweeps, docs/performance.md): split contexts below two per SM, 32-token tiles from two to four,
64-token tiles from four."""

import pytest

from adrenaline_py.attention.triton_decode import default_config


@pytest.mark.parametrize("batch, sms, block_n, one_partition", [
    (32, 132, 64, False),    # 256 programs < 2 x 132: the context is split, wide tiles, 8 warps
    (33, 132, 32, True),     # 264 = 2 per SM: 32-token tiles, one partition per sequence
    (65, 132, 32, True),     # 520 < 4 x 132
    (66, 132, 64, True),     # 528 = 4 per SM: 64-token tiles
    (128, 132, 64, True),
    (26, 104, 32, True),     # under an MPS share the SMs the process gets set the bands: 208 = 2 x 104
    (52, 104, 64, True),     # 416 = 4 x 104
])
def test_tiles_follow_programs_per_sm(batch, sms, block_n, one_partition):
    cfg = default_config(batch, num_kv_heads=8, group=4, head_dim=128, page=16, max_seq_len=2048, num_sms=sms)
    assert cfg.block_n == block_n
    assert (cfg.partition >= 2048) == one_partition
    assert cfg.partition % cfg.block_n == 0
