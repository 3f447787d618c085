"""2D RoPE (spec §10-O8 and §9-B1)."""
import pytest
import torch

from tim_ray.models.rope import apply_rope, grid_positions, rope_tables

HEAD_DIM = 16


def rotate(x, positions):
    cos, sin = rope_tables(positions, HEAD_DIM, torch.float64)
    return apply_rope(x, cos, sin)


def test_rope_preserves_norms():
    positions = grid_positions(5, 5)
    x = torch.randn(2, 3, 25, HEAD_DIM, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, positions).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("mapping", ["row_col", "official"])
def test_logits_are_invariant_to_a_common_shift_on_square_grids(mapping):
    positions = grid_positions(6, 6, mapping)
    q = torch.randn(36, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(36, HEAD_DIM, dtype=torch.float64)
    logits = rotate(q, positions) @ rotate(k, positions).T
    for shift in ([3, 0], [0, 7], [11, -4]):
        moved = positions + torch.tensor(shift)
        torch.testing.assert_close(rotate(q, moved) @ rotate(k, moved).T, logits)


def test_a_position_difference_changes_the_logits():
    q, k = torch.randn(1, HEAD_DIM, dtype=torch.float64), torch.randn(1, HEAD_DIM, dtype=torch.float64)
    origin = rotate(q, torch.tensor([[0, 0]])) @ rotate(k, torch.tensor([[0, 0]])).T
    for other in ([1, 0], [0, 1]):
        assert not torch.allclose(rotate(q, torch.tensor([[0, 0]])) @ rotate(k, torch.tensor([other])).T, origin)


def test_row_col_gives_each_token_its_column_and_row():
    h, w = 2, 4
    positions = grid_positions(h, w, "row_col")
    assert positions.tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1], [1, 1], [2, 1], [3, 1]]
    h, w = 16, 32
    positions = grid_positions(h, w, "row_col")
    for row in range(h):
        for col in range(w):
            assert positions[row * w + col].tolist() == [col, row]


def test_official_mapping_is_pinned():
    """The released checkpoints' mapping: (n mod h, n div h). Token (row 0, col 2) of a 2x4 grid gets (0, 1)."""
    positions = grid_positions(2, 4, "official")
    assert positions.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [1, 2], [0, 3], [1, 3]]
    assert positions[0 * 4 + 2].tolist() == [0, 1]
    assert torch.equal(grid_positions(5, 5, "official"), grid_positions(5, 5, "row_col"))


def test_tables_use_the_official_frequencies_and_pair_layout():
    """First half: column, second half: row; frequencies 10000^(-2j/d) per axis half d, each used by a pair."""
    cos, sin = rope_tables(torch.tensor([[3, 5]]), HEAD_DIM, torch.float64)
    d = HEAD_DIM // 2
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.cat([3 * freqs, 5 * freqs]).repeat_interleave(2)
    torch.testing.assert_close(cos[0], angles.cos())
    torch.testing.assert_close(sin[0], angles.sin())
    x = torch.arange(HEAD_DIM, dtype=torch.float64)
    zero_cos, zero_sin = torch.zeros(1, HEAD_DIM, dtype=torch.float64), torch.ones(1, HEAD_DIM, dtype=torch.float64)
    quarter_turn = apply_rope(x, zero_cos, zero_sin)
    assert quarter_turn[0, :4].tolist() == [-1.0, 0.0, -3.0, 2.0]


def test_bad_mapping_and_head_dim_are_errors():
    with pytest.raises(ValueError, match="row_col, official"):
        grid_positions(2, 2, "xy")
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables(grid_positions(2, 2), 6)
