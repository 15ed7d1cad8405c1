"""The native kernels over GGUF blocks as stored (``gguf_matmul.cpp``) against the math they claim, for every type
and every build this CPU runs: rows dequantized exactly as the ``gguf`` library dequantizes them; products equal to
float64 products of those weights with the activations as the kernel quantizes them (int8 per block of 32, or of
256 for the K-quants, scale amax / 127, round half to even), up to float32 accumulation; the vector builds
bit-equal, and the amx build's tile path (steps of several rows) within the same bound.

Weights are random bytes: every bit pattern of a block's codes and sub-block scales is a valid weight, so random
blocks reach every code and scale a file can hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from engine.kernels import gguf_matmul, native
from engine.kernels.gguf_matmul import BLOCK_SIZES, GGUFMatmul, StoredMatrix

BLOCK_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34, T.IQ4_NL: 18, T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210,
               T.IQ4_XS: 136}
HALF_FLOATS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
               T.Q6_K: [208], T.IQ4_XS: [0]}  # d, m/dmin
TYPES = list(BLOCK_BYTES)
# float32 accumulation over the blocks, relative to sum |x_hat| |w| (measured: at most 6e-8 over these cases)
ACCUMULATION = 2.0**-21


def runnable(isa: str) -> str:
    """``isa`` where this CPU has its instructions (a skip only where it lacks them; a build that does not compile
    here fails, as tests/test_environment.py reports)."""
    if not native.runs_here(isa):
        pytest.skip(f"this CPU lacks the {isa} build's instructions")
    assert isa in native.isas(), f"the {isa} build did not compile (or, amx, the kernel refused the tiles)"
    return isa


@pytest.fixture(params=list(native.ISAS))
def isa(request) -> str:
    return runnable(request.param)


@pytest.fixture(params=[isa for isa in native.ISAS if isa != "avx2"])
def dense_isa(request) -> str:
    """The builds with a dequantized-weight path for many-row bf16 steps (not avx2: see gguf_matmul.dense_rows)."""
    return runnable(request.param)


def random_matrix(kind: T, rows: int, in_features: int, seed: int = 0, scale: float = 0.01) -> StoredMatrix:
    """Random blocks: random codes and sub-block scales, the block's fp16 factors uniform in +-``scale``."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, in_features // BLOCK_SIZES[kind], BLOCK_BYTES[kind]), dtype=np.uint8)
    for at in HALF_FLOATS[kind]:
        factors = rng.uniform(-scale, scale, blocks.shape[:2]).astype(np.float16)
        blocks[..., at : at + 2] = factors[..., None].view(np.uint8)
    return StoredMatrix(np.ascontiguousarray(blocks.reshape(rows, -1)), kind, in_features)


def library_weight(matrix: StoredMatrix) -> np.ndarray:
    """The ``gguf`` library's dequantization, float64 [out, in]."""
    return dequantize(matrix.blocks, matrix.type).reshape(matrix.out_features, matrix.in_features).astype(np.float64)


def quantized_activations(x: torch.Tensor, block: int) -> np.ndarray:
    """The activations the kernel's integer dots see: int8 codes per block times the block's scale (float32 math)."""
    values = x.float().numpy().reshape(x.shape[0], -1, block)
    amax = np.abs(values).max(-1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    codes = np.rint((values * inverse).astype(np.float32))
    return (codes * (amax / np.float32(127.0))).reshape(x.shape).astype(np.float64)


def assert_computes_its_product(y: torch.Tensor, x: torch.Tensor, weight: np.ndarray, block: int,
                                bias: np.ndarray | None = None, one_code: bool = False) -> None:
    """``one_code``: ``x`` is only close to the kernel's input (its own float32 norm, summed in another order), so
    any activation code may be one step off."""
    x_hat = quantized_activations(x, block)
    expected = x_hat @ weight.T + (0 if bias is None else bias)
    size = np.abs(x_hat) @ np.abs(weight).T + (0 if bias is None else np.abs(bias))
    bound = np.abs(expected) * (2.0**-8 if y.dtype == torch.bfloat16 else 2.0**-24) + ACCUMULATION * size
    if one_code:
        steps = np.abs(x.double().numpy().reshape(x.shape[0], -1, block)).max(-1, keepdims=True) / 127
        bound += np.broadcast_to(steps, (x.shape[0], x.shape[1] // block, block)).reshape(x.shape) @ np.abs(weight).T
    error = np.abs(y.double().numpy() - expected)
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_rows_are_the_library_dequantization(kind, isa):
    matrix = random_matrix(kind, 40, 512, seed=3)
    ids = torch.tensor([39, 0, 7, 7])
    assert np.array_equal(gguf_matmul.rows(matrix, ids, isa).numpy(), library_weight(matrix)[ids].astype(np.float32))


def test_row_ids_are_bounded(isa):
    matrix = random_matrix(T.Q4_K, 8, 256)
    for ids in ([8], [-1]):
        with pytest.raises(IndexError):
            gguf_matmul.rows(matrix, torch.tensor(ids), isa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_kernel_computes_its_quantized_product(kind, rows, dtype, isa):
    """Blocks of 32 over an odd count of blocks (the last unpaired), and Q8_0 over whole super-blocks too (lanes)."""
    for in_features in ((768,) if BLOCK_SIZES[kind] == 256 else (800, 768) if kind == T.Q8_0 else (800,)):
        matrix = random_matrix(kind, 48, in_features, seed=rows)
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)
        y = GGUFMatmul([matrix], [None], None, isa, dtype)(x)
        assert y.dtype == dtype and y.shape == (rows, 48)
        assert_computes_its_product(y, x, library_weight(matrix), BLOCK_SIZES[kind])


@pytest.mark.parametrize("rows", [6, 20])
@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_a_last_tile_of_fewer_outputs_than_a_whole_tile(kind, rows, isa):
    """Tiles of 16 outputs (the avx512 build's lanes, in steps of 8 rows or more: 32, two groups of 16): 40 and 56
    outputs end in a tile of 8 or 24, whose rows past those hold whatever an earlier call left."""
    in_features = 512
    for seed, outputs in ((37, 48), (38, 40), (39, 56)):  # each call reuses the one before's tile state
        matrix = random_matrix(kind, outputs, in_features, seed=seed)
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
        y = GGUFMatmul([matrix], [None], None, isa, torch.float32)(x)
        assert_computes_its_product(y, x, library_weight(matrix), BLOCK_SIZES[kind])


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_every_output_of_rows_read_in_runs_side_by_side(kind, rows, isa):
    """Steps of one or two rows read a thread's outputs of a matrix as 4 runs side by side: outputs that split
    unevenly (a thread's 21 outputs as runs of 5, 5, 5 and 6; fewer outputs than runs) each get their own row's
    product, and two matrices of a call each their own runs."""
    in_features = 512
    for seed, outputs in ((40, 1), (41, 3), (42, 19), (43, 37), (44, 70)):
        matrix = random_matrix(kind, outputs, in_features, seed=seed)
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
        y = GGUFMatmul([matrix], [None], None, isa, torch.float32)(x)
        assert_computes_its_product(y, x, library_weight(matrix), BLOCK_SIZES[kind])
    parts = [random_matrix(kind, 37, in_features, seed=45), random_matrix(T.Q6_K, 21, in_features, seed=46)]
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(47))
    y = GGUFMatmul(parts, [None, None], None, isa, torch.float32)(x)
    assert_computes_its_product(y[:, :37], x, library_weight(parts[0]), BLOCK_SIZES[kind])
    assert_computes_its_product(y[:, 37:], x, library_weight(parts[1]), 256)


def test_fused_matrices_of_several_types_with_placed_rows_a_bias_and_a_norm(isa):
    """q/k/v-like parts of different types in one call; the second part's rows written to permuted columns (GGUF
    llama's q/k order), a bias over the outputs, and an RMSNorm applied to each row before quantizing."""
    parts = [random_matrix(T.Q4_K, 32, 512, 1), random_matrix(T.Q6_K, 16, 512, 2), random_matrix(T.Q8_0, 16, 512, 3)]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(64, generator=torch.Generator().manual_seed(5))
    kernel = GGUFMatmul(parts, [None, 32 + order, None], bias, isa, torch.float32)
    norm = torch.rand(512, generator=torch.Generator().manual_seed(6)) + 0.5
    kernel.fuse_norm(norm, 1e-6)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(7))
    y = kernel(x)
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm
    weights = [library_weight(p) for p in parts]
    placed = weights[1].copy()
    placed[order.numpy()] = weights[1]
    for columns, weight, block in ((slice(0, 32), weights[0], 256), (slice(32, 48), placed, 256),
                                   (slice(48, 64), weights[2], 32)):
        # the norm is applied in float32 inside the kernel: compare against its own quantization of those rows
        assert_computes_its_product(y[:, columns], normalized, weight, block, bias[columns].double().numpy(),
                                    one_code=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", [T.Q4_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_a_down_projection_applies_swiglu_to_its_gate_and_up_halves(kind, dtype, isa):
    """Rows [gate | up] of 2 x 512: the kernel's inputs are SiLU(gate) * up in float32 (its exp within 2e-7), then
    quantized as any input; gates far below and above zero included."""
    matrix = random_matrix(kind, 48, 512, seed=21)
    kernel = GGUFMatmul([matrix], [None], None, isa, dtype)
    kernel.fuse_swiglu()
    x = (torch.randn(6, 1024, generator=torch.Generator().manual_seed(22)) * 4).to(dtype)
    x[0, :4] = torch.tensor([-90.0, -20.0, 20.0, 90.0]).to(dtype)
    y = kernel(x)
    gate, up = x.double().chunk(2, dim=-1)
    assert y.shape == (6, 48) and y.dtype == dtype
    assert_computes_its_product(y, torch.nn.functional.silu(gate) * up, library_weight(matrix), BLOCK_SIZES[kind],
                                one_code=True)


@pytest.mark.parametrize("rows", [3, 6])
def test_the_bias_is_added_to_the_float32_result(rows, isa):
    matrix = random_matrix(T.Q6_K, 48, 512, seed=34)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(35))
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(36))
    with_bias = GGUFMatmul([matrix], [None], bias, isa, torch.float32)(x)
    assert torch.equal(with_bias, GGUFMatmul([matrix], [None], None, isa, torch.float32)(x) + bias)


@pytest.mark.parametrize("rows", [3, 6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_residual_takes_the_result_in_place_rounded_once(dtype, rows, isa):
    """out = residual + x @ W^T: the same tensor comes back, holding the kernel's float32 result plus the residual,
    rounded once (an fp32 model's sum is exactly torch's residual + y)."""
    matrix = random_matrix(T.Q4_K, 64, 512, seed=23)
    kernel = GGUFMatmul([matrix], [None], None, isa, dtype)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(24)).to(dtype)
    residual = torch.randn(rows, 64, generator=torch.Generator().manual_seed(25)).to(dtype)
    alone = GGUFMatmul([matrix], [None], None, isa, dtype, torch.float32)(x)
    expected = (residual.float() + alone).to(dtype)
    target = residual.clone()
    assert kernel(x, target) is target
    assert torch.equal(target, expected)
    if dtype == torch.float32:
        assert torch.equal(target, residual + kernel(x))


def test_many_row_steps_apply_swiglu_and_the_residual_too(dense_isa):
    """The dequantized-weight path (``dense_rows`` rows) computes the same activation and adds the residual."""
    matrix = random_matrix(T.Q4_K, 32, 512, seed=26)
    kernel = GGUFMatmul([matrix], [None], None, dense_isa)
    kernel.fuse_swiglu()
    x = torch.randn(kernel.dense_rows, 1024, generator=torch.Generator().manual_seed(27)).bfloat16()
    gate, up = x.float().chunk(2, dim=-1)
    weight = torch.from_numpy(library_weight(matrix)).to(torch.bfloat16)
    product = torch.nn.functional.linear((torch.nn.functional.silu(gate) * up).bfloat16(), weight)
    residual = torch.randn(kernel.dense_rows, 32, generator=torch.Generator().manual_seed(28)).bfloat16()
    assert torch.equal(kernel(x, residual.clone()), residual + product)


LANE_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]  # Q8_0 where the inputs are whole super-blocks of 256


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_rows_do_not_depend_on_the_rest_of_the_batch(kind, isa):
    """A row's outputs depend on its own inputs only, whichever rows share its step, as long as the step runs the
    same kernel (steps of ``TILE_ROWS`` rows or more: the amx build's tiles; of ``LANE_ROWS`` or more: the vector
    builds' lanes)."""
    matrix = random_matrix(kind, 64, 1024, seed=9)
    many = gguf_matmul.TILE_ROWS if isa == "amx" else gguf_matmul.LANE_ROWS
    x = torch.randn(many + 7, 1024, generator=torch.Generator().manual_seed(10)).bfloat16()
    kernel = GGUFMatmul([matrix], [None], None, isa, torch.bfloat16, torch.float32)
    together = kernel(x)
    for row in (0, 5, 7):
        assert torch.equal(kernel(x[row : row + many])[0], together[row])
    alone = torch.cat([kernel(x[row : row + 1]) for row in range(len(x))])
    assert torch.equal(kernel(x[:2]), alone[:2])
    assert torch.equal(together, alone) == (isa != "amx" and kind not in LANE_TYPES)


@pytest.mark.parametrize("isa", native.SAME_BITS)
@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_the_vector_builds_run_steps_of_several_rows_on_lanes(kind, isa):
    """The avx512 and avx2 builds: steps of ``LANE_ROWS`` rows or more of Q4_K, Q5_K, Q6_K, and Q8_0 over whole
    super-blocks of inputs, run 16 weight rows side by side, rounded in their own order (their bound:
    test_kernel_computes_its_quantized_product), so some output differs from the row-by-row kernel's bits; fewer
    rows, and the other matrices, give that kernel's bits."""
    runnable(isa)
    for in_features in (768, 800) if BLOCK_SIZES[kind] == 32 else (768,):
        matrix = random_matrix(kind, 48, in_features, seed=34)
        x = torch.randn(gguf_matmul.LANE_ROWS, in_features, generator=torch.Generator().manual_seed(35)).bfloat16()
        kernel = GGUFMatmul([matrix], [None], None, isa, torch.bfloat16, torch.float32)
        alone = torch.cat([kernel(x[row : row + 1]) for row in range(len(x))])
        assert torch.equal(kernel(x[:-1]), alone[:-1])
        assert torch.equal(kernel(x), alone) != gguf_matmul.on_lanes(matrix)
        assert gguf_matmul.on_lanes(matrix) == (kind in LANE_TYPES and in_features % 256 == 0)


@pytest.mark.parametrize("kind", LANE_TYPES, ids=lambda t: t.name)
def test_the_largest_codes_against_the_largest_activations(kind, isa):
    """Every code at its largest (all bits set; Q8_0: -128) against activations all +127 or all -127: the lanes'
    int16 sums reach their largest magnitude (Q6_K: 2 x 2 x 63 x 127 = 32,004; Q8_0 on avx2: 2 x 128 x 127 =
    32,512) without overflowing."""
    blocks = np.full((16, 512 // BLOCK_SIZES[kind] * BLOCK_BYTES[kind]), 0x80 if kind == T.Q8_0 else 0xFF, np.uint8)
    matrix = random_matrix(kind, 16, 512, seed=39)  # its fp16 factors, on all-ones codes and scales
    for at in HALF_FLOATS[kind]:
        for block in range(512 // BLOCK_SIZES[kind]):
            start = block * BLOCK_BYTES[kind] + at
            blocks[:, start : start + 2] = matrix.blocks[:, start : start + 2]
    matrix = StoredMatrix(blocks, kind, 512)
    x = torch.ones(gguf_matmul.LANE_ROWS + 1, 512)
    x[1::2] = -1.0
    y = GGUFMatmul([matrix], [None], None, isa, torch.float32)(x)
    assert_computes_its_product(y, x, library_weight(matrix), BLOCK_SIZES[kind])


@pytest.mark.parametrize("kind", LANE_TYPES, ids=lambda t: t.name)
def test_a_float32_step_of_more_rows_than_a_decoded_super_block_serves(kind, isa):
    """An fp32 model's steps never take the dequantized weight: 150 rows run as chunks of 64 over each super-block."""
    matrix = random_matrix(kind, 40, 512, seed=36)
    x = torch.randn(150, 512, generator=torch.Generator().manual_seed(36))
    y = GGUFMatmul([matrix], [None], None, isa, torch.float32)(x)
    assert_computes_its_product(y, x, library_weight(matrix), BLOCK_SIZES[kind])


@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_the_builds_compute_the_same_bits(kind):
    for isa in native.SAME_BITS:
        runnable(isa)
    matrix = random_matrix(kind, 64, 768, seed=11)
    x = torch.randn(9, 768, generator=torch.Generator().manual_seed(12)).bfloat16()
    results = [GGUFMatmul([matrix], [None], None, isa, torch.bfloat16, torch.float32)(x) for isa in native.SAME_BITS]
    assert torch.equal(results[0], results[1])


TILE_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]


@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_the_amx_build_runs_steps_of_several_rows_on_tiles(kind):
    """The amx build: steps of ``TILE_ROWS`` rows or more of a tile type (Q8_0 over whole super-blocks of inputs)
    on AMX tiles, whose sums are rounded in their own order (their bound: test_kernel_computes_its_quantized_product),
    so some output differs from the vector kernel's bits; fewer rows, and the other types, give avx512's bits."""
    for isa in ("amx", "avx512"):
        runnable(isa)
    for in_features in (768, 800) if kind == T.Q8_0 else (768,):
        matrix = random_matrix(kind, 48, in_features, seed=32)
        x = torch.randn(gguf_matmul.TILE_ROWS, in_features, generator=torch.Generator().manual_seed(33)).bfloat16()
        tiles, vector = (GGUFMatmul([matrix], [None], None, isa, torch.bfloat16, torch.float32)
                         for isa in ("amx", "avx512"))
        few = x[: gguf_matmul.TILE_ROWS - 1]
        assert torch.equal(tiles(few), vector(few))
        on_tiles = kind in TILE_TYPES and in_features % 256 == 0
        assert torch.equal(tiles(x), vector(x)) != on_tiles


def test_the_builds_compute_the_same_activation_and_residual_bits():
    for isa in native.SAME_BITS:
        runnable(isa)
    matrix = random_matrix(T.Q4_K, 64, 512, seed=29)
    x = (torch.randn(5, 1024, generator=torch.Generator().manual_seed(30)) * 4).bfloat16()
    residual = torch.randn(5, 64, generator=torch.Generator().manual_seed(31)).bfloat16()
    results = []
    for isa in native.SAME_BITS:
        kernel = GGUFMatmul([matrix], [None], None, isa)
        kernel.fuse_swiglu()
        results.append(kernel(x, residual.clone()))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_the_dequantized_weight_is_the_library_dequantization(kind, isa):
    """The weight a dense step runs on: each part's rows at their columns, in bf16."""
    parts = [random_matrix(kind, 32, 512, 13), random_matrix(kind, 16, 512, 14)]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(15)) + 32
    kernel = GGUFMatmul(parts, [None, order], None, isa)
    weight = torch.zeros(48, 512, dtype=torch.float64)
    weight[:32] = torch.from_numpy(library_weight(parts[0]))
    weight[order] = torch.from_numpy(library_weight(parts[1]))
    assert torch.equal(kernel.dense_weight(), weight.to(torch.bfloat16))


@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_many_row_steps_run_the_dequantized_weight(kind, dense_isa):
    """From ``dense_rows`` rows torch's GEMM runs on the dequantized weight, with the fused norm applied first and
    the bias in float32; one row fewer runs the quantized kernels."""
    parts = [random_matrix(kind, 32, 512, 13), random_matrix(kind, 16, 512, 14)]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(15)) + 32
    bias = torch.randn(48, generator=torch.Generator().manual_seed(16))
    kernel = GGUFMatmul(parts, [None, order], bias, dense_isa)
    norm = torch.rand(512, generator=torch.Generator().manual_seed(17)) + 0.5
    kernel.fuse_norm(norm, 1e-5)
    x = torch.randn(kernel.dense_rows, 512, generator=torch.Generator().manual_seed(18)).bfloat16()
    normalized = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * norm).bfloat16()
    expected = (torch.nn.functional.linear(normalized, kernel.dense_weight()).float() + bias).bfloat16()
    assert torch.equal(kernel(x), expected)
    assert not torch.equal(kernel(x[:-1]), expected[:-1])


@pytest.mark.parametrize("kind", TYPES, ids=[t.name for t in TYPES])
def test_the_many_row_kernels_take_steps_up_to_more_rows_than_the_row_kernel(kind, dense_isa):
    """A product whose every matrix runs on the build's many-row kernel (the lanes, or the amx build's tiles) leaves
    the quantized kernels later than one that does not."""
    matrix = random_matrix(kind, 16, 512)
    many_row = kind in LANE_TYPES
    rows = GGUFMatmul([matrix], [None], None, dense_isa).dense_rows
    assert rows == (gguf_matmul.MANY_ROW_DENSE_ROWS if many_row else gguf_matmul.DENSE_ROWS)
    assert gguf_matmul.MANY_ROW_DENSE_ROWS > gguf_matmul.DENSE_ROWS
    mixed = [matrix, random_matrix(T.Q4_0, 16, 512)]
    assert GGUFMatmul(mixed, [None, None], None, dense_isa).dense_rows == gguf_matmul.DENSE_ROWS


@pytest.mark.parametrize("kind", [T.Q4_K, T.Q8_0], ids=lambda t: t.name)
def test_the_avx2_build_never_runs_the_dequantized_weight(kind):
    """The avx2 build (what CPUs without AVX512 run, whose bf16 GEMM is slow) keeps a step of many bf16 rows on its
    kernels: each row's bits are those of the row computed in a step of its kernel's kind."""
    runnable("avx2")
    matrix = random_matrix(kind, 32, 512, seed=40)
    kernel = GGUFMatmul([matrix], [None], None, "avx2", torch.bfloat16, torch.float32)
    step = gguf_matmul.LANE_ROWS if kind in LANE_TYPES else 1
    x = torch.randn(gguf_matmul.MANY_ROW_DENSE_ROWS + step, 512, generator=torch.Generator().manual_seed(41)).bfloat16()
    apart = torch.cat([kernel(x[row : row + step]) for row in range(0, len(x), step)])
    assert torch.equal(kernel(x), apart)


def test_types_without_a_kernel_are_refused():
    assert not gguf_matmul.fits(StoredMatrix(np.zeros((4, 2 * 22), np.uint8), T.Q5_0, 64))
    assert not gguf_matmul.fits(StoredMatrix(np.zeros((4, 84), np.uint8), T.Q2_K, 256))
    assert all(gguf_matmul.fits(StoredMatrix(np.zeros((4, BLOCK_BYTES[t] * 8 // (BLOCK_SIZES[t] // 32)), np.uint8), t,
                                             256)) for t in TYPES)
