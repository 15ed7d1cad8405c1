"""The native kernels against the math they claim (int4 x int8: activations quantized to int8 per block of 16,
scale amax / 127, round half to even, exact integer dots, weight scales and offsets per block of 32), for every
build this CPU runs (``isa``: amx, avx512, avx2), and the builds against each other bit for bit."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import native, q4q8, q8head
from engine.kv_store import LayerCache, quantize_rows
from engine.weights.int4 import Int4Weight

pytestmark = pytest.mark.skipif(not native.available(), reason="no AVX2/AVX512 CPU or no C++ compiler")


@pytest.fixture(params=list(native.ISAS))
def isa(request) -> str:
    if request.param not in native.isas():
        pytest.skip(f"this CPU does not run the {request.param} build")
    return request.param


def random_weight(out_features: int, in_features: int, group_size: int = 32, seed: int = 0) -> Int4Weight:
    generator = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    return Int4Weight(torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator),
                      torch.rand(out_features, groups, generator=generator) * 0.02,
                      torch.randn(out_features, groups, generator=generator) * 0.05, group_size)


def reference(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 result of the kernel's arithmetic, before its final rounding to bf16."""
    rows, k = x.shape
    halves = x.float().view(rows, -1, 16)
    amax = halves.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)  # not 127.0 / amax: reciprocal * 127
    q = (halves * inverse).round()
    x_hat = (q * (amax / 127.0)).view(rows, k).double()  # what the integer dots see
    w = weight.q.double()
    scale = weight.scale.double().repeat_interleave(weight.group_size, dim=1)
    offset = weight.zero.double().repeat_interleave(weight.group_size, dim=1)
    y = x_hat @ (w * scale).T + x.double() @ offset.T  # offsets meet the exact block sums of x
    return y if bias is None else y + bias.double()


def bf16_half_ulp(values: torch.Tensor) -> torch.Tensor:
    return values.abs().clamp(min=1e-30) * 2.0**-8


def output_rounding(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of the kernel's output type (bf16, or fp32 for an fp32 model)."""
    return bf16_half_ulp(values) if dtype == torch.bfloat16 else values.abs() * 2.0**-24


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 16, 33])
@pytest.mark.parametrize("shape,group_size", [((64, 96), 32), ((960, 576), 32), ((48, 256), 128)])
def test_kernel_computes_its_quantized_product(rows, shape, group_size, dtype, isa):
    weight = random_weight(*shape, group_size=group_size, seed=rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    y = q4q8.Q4Q8Matmul(q4q8.pack(weight), None, isa, dtype)(x)
    expected = reference(x, weight)
    assert y.dtype == dtype and y.shape == (rows, shape[0])
    # one rounding to the output type, plus float32 accumulation over the blocks
    assert ((y.double() - expected).abs() <= output_rounding(expected, dtype) + 1e-4).all()


def test_an_outlier_coarsens_only_its_own_block(isa):
    weight = random_weight(256, 512)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x[:, 7] = 40.0
    exact = x.double() @ weight.dequantize().double().T
    y = q4q8.Q4Q8Matmul(q4q8.pack(weight), None, isa)(x).double()
    row_scale = x.float().abs().amax(-1, keepdim=True) / 127.0  # what one scale per row would do
    per_row = ((x.float() / row_scale).round() * row_scale).double() @ weight.dequantize().double().T
    blocks_error = (y - exact).norm() / exact.norm()
    assert blocks_error < 0.01
    assert blocks_error < (per_row - exact).norm() / exact.norm() / 3


def test_rows_do_not_depend_on_the_rest_of_the_batch(isa):
    weight = q4q8.pack(random_weight(576, 1536))
    matmul = q4q8.Q4Q8Matmul(weight, None, isa)
    x = torch.randn(16, 1536).to(torch.bfloat16)
    together = matmul(x)
    assert torch.equal(torch.cat([matmul(x[i : i + 1]) for i in range(16)]), together)
    assert torch.equal(matmul(x[5:11]), together[5:11])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_amx_build_computes_avx512s_bits_on_tiles(dtype):
    """From ``q4q8.TILE_ROWS`` rows the amx build computes on AMX tiles (rows in chunks of 16, the last one padded)
    and scales each half-block's exact dots as the vector kernel does, in its order: the same bits, with a bias, a
    fused norm, or SwiGLU and a residual."""
    for isa in ("amx", "avx512"):
        if isa not in native.isas():
            pytest.skip(f"this CPU does not run the {isa} build")
    weight = q4q8.pack(random_weight(96, 512, group_size=64, seed=8))
    bias = torch.randn(96, generator=torch.Generator().manual_seed(9))
    norm = torch.rand(512, generator=torch.Generator().manual_seed(10)) + 0.5
    for rows in (q4q8.TILE_ROWS - 1, q4q8.TILE_ROWS, 17, 40):
        x = (torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype)
        residual = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows + 1)).to(dtype)
        results = []
        for isa in ("amx", "avx512"):
            plain, normed, gated = (q4q8.Q4Q8Matmul(weight, bias, isa, dtype) for _ in range(3))
            normed.fuse_norm(norm, 1e-5)
            gated.fuse_swiglu()
            results.append((plain(x[:, :512]), normed(x[:, 512:]), gated(x, residual.clone())))
        for tiles, vector in zip(*results, strict=True):
            assert torch.equal(tiles, vector)


def test_bias_is_added_in_float32(isa):
    weight = random_weight(32, 64)
    bias = torch.randn(32)
    x = torch.randn(2, 64).to(torch.bfloat16)
    y = q4q8.Q4Q8Matmul(q4q8.pack(weight), bias, isa)(x)
    expected = reference(x, weight, bias)
    assert ((y.double() - expected).abs() <= bf16_half_ulp(expected) + 1e-4).all()


def test_shapes_the_kernel_does_not_take_are_refused():
    assert q4q8.fits(random_weight(32, 64))
    assert not q4q8.fits(random_weight(24, 64))  # not whole tiles of 16 outputs
    assert not q4q8.fits(Int4Weight(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 4), torch.zeros(16, 4), 16))


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_q8_head_matches_the_dequantized_head(rows, isa):
    """Q8_0 weights times 16-bit block-quantized activations: within 1e-4 of fp64 on the stored weights."""
    generator = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (320, 576), dtype=torch.int8, generator=generator)
    scale = torch.rand(320, 18, generator=generator) * 0.01
    x = torch.randn(rows, 576, generator=generator) * 3
    weight = (q.double().view(320, 18, 32) * scale.double()[..., None]).view(320, 576)
    expected = x.double() @ weight.T
    y = q8head.Q8Matmul(q, scale, isa)(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert torch.equal(torch.cat([q8head.Q8Matmul(q, scale, isa)(x[i : i + 1]) for i in range(rows)]), y)


def test_gguf_q8_head_is_kept_as_stored(smollm2_gguf):
    from engine.weights.gguf_tensors import GGUFTensors

    tensors = GGUFTensors(smollm2_gguf)
    q, scale = tensors.int8("token_embd.weight")
    dense = tensors.dense("token_embd.weight")
    stored = (q.float().view(q.shape[0], -1, 32) * scale[..., None]).view(q.shape)
    torch.testing.assert_close(stored, dense, atol=0, rtol=0)
    assert tensors.int8("blk.0.attn_q.weight") is None  # Q4_1


def rms_normalized(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def test_a_fused_rms_norm_normalizes_each_row_before_quantizing(isa):
    weight = random_weight(64, 256)
    x = (torch.randn(5, 256) * torch.linspace(0.1, 30, 5)[:, None]).to(torch.bfloat16)  # rows of any scale
    norm = torch.rand(256) + 0.5
    matmul = q4q8.Q4Q8Matmul(q4q8.pack(weight), None, isa)
    matmul.fuse_norm(norm, 1e-5)
    y = matmul(x).double()
    normalized = rms_normalized(x, norm, 1e-5)
    expected = reference(normalized.float(), weight)
    # fp32 normalization may land a value on the other side of a rounding boundary: a few int8 steps at most
    assert (y - expected).abs().max() < 0.02 * expected.abs().max()
    exact = normalized @ weight.dequantize().double().T
    assert (y - exact).norm() / exact.norm() < 0.01


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_down_projection_applies_swiglu_and_adds_into_the_residual(dtype, isa):
    """Rows [gate | up] of 2 x 256 (gates far below and above zero included): the inputs are SiLU(gate) * up in
    float32 (its exp within 2e-7), quantized as any input; the result lands in the residual, rounded once, and for
    an fp32 model is exactly torch's residual + y."""
    weight = random_weight(64, 256, seed=5)
    matmul = q4q8.Q4Q8Matmul(q4q8.pack(weight), None, isa, dtype)
    matmul.fuse_swiglu()
    x = (torch.randn(5, 512, generator=torch.Generator().manual_seed(6)) * 4).to(dtype)
    x[0, :4] = torch.tensor([-90.0, -20.0, 20.0, 90.0]).to(dtype)
    gate, up = x.double().chunk(2, dim=-1)
    activated = torch.nn.functional.silu(gate) * up
    y = matmul(x).double()
    expected = reference(activated.float(), weight)
    # the kernel's own float32 activation may land a value on the other side of a rounding boundary
    assert (y - expected).abs().max() < 0.02 * expected.abs().max()
    exact = activated @ weight.dequantize().double().T
    assert (y - exact).norm() / exact.norm() < 0.01
    residual = torch.randn(5, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    target = residual.clone()
    assert matmul(x, target) is target
    unrounded = q4q8.Q4Q8Matmul(q4q8.pack(weight), None, isa, torch.float32)
    unrounded.fuse_swiglu()
    assert torch.equal(target, (residual.float() + unrounded(x.float())).to(dtype))


def test_q8_head_fused_norm(isa):
    generator = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (64, 96), dtype=torch.int8, generator=generator)
    scale = torch.rand(64, 3, generator=generator) * 0.01
    x, norm = torch.randn(3, 96, generator=generator) * 50, torch.rand(96, generator=generator)
    matmul = q8head.Q8Matmul(q, scale, isa)
    matmul.fuse_norm(norm, 1e-6)
    weight = (q.double().view(64, 3, 32) * scale.double()[..., None]).view(64, 96)
    expected = rms_normalized(x, norm, 1e-6) @ weight.T
    torch.testing.assert_close(matmul(x).double(), expected, atol=1e-4 * expected.abs().max().item(), rtol=0)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def random_cache(slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype, int8: bool,
                 generator: torch.Generator) -> LayerCache:
    """A layer's cache full of random keys and values (int8 ones with random scales)."""
    if not int8:
        return LayerCache(*(torch.randn(slots, kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2)))
    rows = [torch.randint(-127, 128, (slots, kv_heads, head_dim), dtype=torch.int8, generator=generator)
            for _ in range(2)]
    return LayerCache(*rows, *(torch.rand(slots, kv_heads, generator=generator) * 0.05 for _ in range(2)))


def cached(cache: LayerCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at ``slots`` as the cache means them, in fp64."""
    return cache.read(slots, torch.float64) if cache.quantized else (cache.k[slots].double(), cache.v[slots].double())


def head_normed(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Each head [..., D] RMS-normalised and weighted in fp64, rounded to ``dtype`` as the model's norm rounds."""
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(dtype).double()


def rotate_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``rotate_half`` over the first dims of each head that ``cos`` covers (partial rotary), the rest kept."""
    rotated = cos.shape[-1]
    return torch.cat((rotate_half(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)


@pytest.mark.parametrize("int8", [False, True], ids=["model-dtype-cache", "int8-cache"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,head_dim,with_logn,rotated,head_norms", [
    (9, 3, 64, False, 64, False), (4, 4, 128, True, 128, False), (8, 2, 32, False, 32, False),
    (8, 4, 128, False, 128, True),  # Qwen3: per-head norms of q and k before RoPE
    (4, 2, 256, False, 64, True),  # Qwen3.5's attention layers: 256-dim heads, a quarter of each rotated
    (45, 9, 32, False, 32, False),  # more heads than a job takes (32): two jobs a sequence, the second from mid-group
], ids=["gqa-64", "logn-128", "gqa-32", "head-norms-128", "head-norms-256-partial", "gqa-45"])
def test_paged_decode_attention_rotates_writes_and_attends(heads, kv_heads, head_dim, with_logn, rotated, head_norms,
                                                           dtype, int8, isa):
    """The per-head norms, RoPE, the cache write and attention over each sequence's scattered slots, against fp64
    SDPA over what the cache holds; an int8 cache gets the rows ``quantize_rows`` makes of the new key and value
    (the key's fp32 rotation may round a value across a rounding edge: one step at most)."""
    from engine.kernels.attention import PagedDecodeAttention
    from engine.layers import RMSNorm

    generator = torch.Generator().manual_seed(heads * head_dim)
    slots, lens = 512, torch.tensor([1, 17, 100, 5, 64])
    batch, width = len(lens), int(lens.max())
    cache = random_cache(slots, kv_heads, head_dim, dtype, int8, generator)
    kv_slots = torch.zeros(batch, width, dtype=torch.long)
    pool = torch.randperm(slots, generator=generator)
    for b, n in enumerate(lens.tolist()):  # left-padded, scattered over the pool like block tables' slots, none shared
        kv_slots[b, width - n :], pool = pool[:n], pool[n:]
    write_slots = kv_slots[:, -1].clone()  # the new token is each sequence's last key
    qkv = (torch.randn(batch, (heads + 2 * kv_heads) * head_dim, generator=generator) * 3).to(dtype)
    angles = torch.rand(batch, rotated // 2, generator=generator) * 6
    cos = angles.cos().repeat(1, 2)[:, None].to(dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)[:, None].to(dtype)
    logn = (1 + torch.rand(batch, 1, 1, generator=generator)).to(dtype) if with_logn else None
    norms = [RMSNorm(head_dim, 1e-6, dtype) for _ in range(2)] if head_norms else [None, None]
    for norm in norms:
        if norm is not None:
            norm.weight.data = (0.5 + torch.rand(head_dim, generator=generator)).to(dtype)

    out = PagedDecodeAttention(heads, kv_heads, head_dim, isa=isa, rotated_dim=rotated, q_norm=norms[0],
                               k_norm=norms[1])(qkv, cos, sin, logn, write_slots, cache, kv_slots, lens)

    parts = qkv.double().view(batch, heads + 2 * kv_heads, head_dim)
    q_in, k_in = parts[:, :heads], parts[:, heads : heads + kv_heads]
    if head_norms:
        q_in, k_in = head_normed(q_in, norms[0].weight, 1e-6, dtype), head_normed(k_in, norms[1].weight, 1e-6, dtype)
    q = rotate_first(q_in, cos.double(), sin.double())
    if logn is not None:
        q = q * logn.double()
    k_new = rotate_first(k_in, cos.double(), sin.double())
    v_new = qkv.view(batch, -1, head_dim)[:, heads + kv_heads :]
    if int8:
        k_rows, k_scales = quantize_rows(k_new.float())
        assert ((cache.k[write_slots].int() - k_rows.int()).abs() <= 1).all()
        torch.testing.assert_close(cache.k_scale[write_slots], k_scales, atol=0, rtol=1e-5 if head_norms else 1e-6)
        v_rows, v_scales = quantize_rows(v_new)
        assert torch.equal(cache.v[write_slots], v_rows) and torch.equal(cache.v_scale[write_slots], v_scales)
    elif dtype == torch.bfloat16 and not head_norms:
        assert torch.equal(cache.k[write_slots], k_new.to(dtype))
    elif dtype == torch.bfloat16:  # a normalised value on a rounding edge of bf16 may round the other way: one step
        written, want = cache.k[write_slots].double(), k_new.to(dtype).double()
        assert ((written - want).abs() <= want.abs() * 2**-7 + 1e-6).all()
        assert (written != want).double().mean() <= 0.01
    else:  # fp32: the rotation's product and fused add round a little apart from fp64
        torch.testing.assert_close(cache.k[write_slots].double(), k_new, rtol=0, atol=1e-5 if head_norms else 1e-6)
    if not int8:
        assert torch.equal(cache.v[write_slots], v_new)
    for b, n in enumerate(lens.tolist()):
        keys, values = cached(cache, kv_slots[b, width - n :])
        keys = keys.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        values = values.transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        expected = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], keys, values)[:, 0]
        got = out[b].view(heads, head_dim).double()
        assert ((got - expected).abs() <= output_rounding(expected, dtype) + 1e-4).all()


@pytest.fixture
def both_builds() -> tuple[str, str]:
    if not set(native.SAME_BITS) <= set(native.isas()):
        pytest.skip("this CPU runs only some of the builds")
    return native.SAME_BITS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_builds_compute_the_same_bits(both_builds, dtype):
    """AVX2 emulates each AVX512 operation exactly (integer dots, FMA, rounding, reduction order), the int8 cache's
    quantization and reads included."""
    from engine.kernels.attention import PagedDecodeAttention

    generator = torch.Generator().manual_seed(11)
    weight = q4q8.pack(random_weight(320, 576, group_size=64))
    x = torch.randn(11, 576, generator=generator).to(dtype)
    norm = torch.rand(576, generator=generator) + 0.5
    q = torch.randint(-127, 128, (96, 576), dtype=torch.int8, generator=generator)
    scale = torch.rand(96, 18, generator=generator) * 0.01
    results = []
    for isa in both_builds:
        linear = q4q8.Q4Q8Matmul(weight, torch.randn(320, generator=torch.Generator()), isa, dtype)
        linear.fuse_norm(norm, 1e-5)
        head = q8head.Q8Matmul(q, scale, isa)
        head.fuse_norm(norm, 1e-6)
        caches = [random_cache(256, 2, 64, dtype, int8, torch.Generator().manual_seed(1)) for int8 in (False, True)]
        qkv = torch.randn(3, 8 * 64, generator=torch.Generator().manual_seed(3)).to(dtype)
        angles = torch.rand(3, 32, generator=torch.Generator().manual_seed(4))
        cos = angles.cos().repeat(1, 2)[:, None].to(dtype)
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)[:, None].to(dtype)
        lens = torch.tensor([1, 37, 200])  # a tail of 5 and 8 keys after whole groups of 16
        kv_slots = torch.zeros(3, 200, dtype=torch.long)
        for b, n in enumerate(lens.tolist()):
            kv_slots[b, 200 - n :] = torch.randperm(256, generator=torch.Generator().manual_seed(b))[:n]
        attention = [PagedDecodeAttention(4, 2, 64, isa=isa)(qkv, cos, sin, None, kv_slots[:, -1].clone(), cache,
                                                            kv_slots, lens) for cache in caches]
        written = [tensor for cache in caches for tensor in (cache.k, cache.v, cache.k_scale, cache.v_scale)
                   if tensor is not None]
        results.append((linear(x), head(x.float() * 7), *attention, *written))
    for first, second in zip(*results, strict=True):
        assert torch.equal(first, second)
