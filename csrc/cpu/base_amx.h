// The base product y = x @ W^T (+ bias) of bfloat16 calls on AMX tiles (MILORA_ISA_LEVEL 4),
// reading W as stored. Included only by cpu/lora_kernels.h, inside namespace
// milora::cpu::MILORA_ISA_NS, after cpu/lora_amx.h (amx_configure).
//
// Why not ATen's product (oneDNN): for a few tokens it first reorders W into its blocked layout,
// on every call, so it reads W's bytes more than once; this product reads each W row straight
// into a tile, once. Measured (2 threads, bfloat16 4096 x 4096, caches flushed, medians of 31
// paired rounds, this product / F.linear): 1 token 0.90 / 2.0 ms, 16 tokens 1.0 / 1.9-2.0,
// 64 tokens 1.6-2.2 / 2.7-4.5, 128 tokens 3.4-4.2 / 4.8-6.8, 256 tokens level (10.8 / 11.0),
// 512 tokens 22 / 15. A plain read of W's 32 MB takes 0.8 ms there. So up to kAmxBaseMaxTokens.
//
// The tiles compute y^T: the left operand is 16 rows of W (16 output columns x 32 values of K,
// loaded with W's row stride), the right one 16 tokens' x as bfloat16 pairs (pack_base_x), and
// each 16 x 16 float32 result is transposed in registers, the bias added, rounded once to
// bfloat16 and stored as 16 token rows of 16 columns. Tiles as amx_configure(16, 64, 16) sets
// them: C = tmm0, 3, 5, 6 (up to four token blocks per pass over a W row block), W = tmm1,
// x pairs = tmm2 and tmm4.

constexpr int64_t kAmxBaseMaxTokens = 128;

// r[i] = row i of a 16 x 16 matrix of 32-bit values -> r[i] = column i.
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane L of r[4g + j] now holds column 4L + j of rows 4g .. 4g + 3: gather the
  // four lanes of each column from the four row groups.
  for (int j = 0; j < 4; ++j) {
    const __m512i a = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);       // lanes 0, 2 of each
    const __m512i b = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);       // lanes 1, 3
    const __m512i c = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i d = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_i32x4(a, c, 0x88);        // lane 0: column j
    t[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);    // lane 2: column 8 + j
    t[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);    // lane 1: column 4 + j
    t[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);   // lane 3: column 12 + j
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Token blocks [b0, b1) of x as the tiles' right operand: xt[((b * K / 32 + s) * 16 + p) * 16 + i]
// = the bfloat16 pair (x[16 b + i, 32 s + 2 p], x[16 b + i, 32 s + 2 p + 1]) as one word, 0 for
// tokens past T.
inline void pack_base_x(const BaseJob& j) {
  const int64_t K = j.K, steps = K / 32;
  for (int64_t b = j.b0; b < j.b1; ++b) {
    const int64_t rows = min64(16, j.T - 16 * b);
    for (int64_t s = 0; s < steps; ++s) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? _mm512_loadu_si512(j.x + (16 * b + i) * K + 32 * s) : _mm512_setzero_si512();
      transpose16x16(r);
      uint32_t* out = j.xt + (b * steps + s) * 256;
      for (int p = 0; p < 16; ++p) _mm512_storeu_si512(out + 16 * p, r[p]);
    }
  }
}

// One C tile (16 output columns n0 .. n0 + 16 x 16 tokens of block b, float32) -> y rows.
inline void store_base_block(const float* c, const __m512& bias, const BaseJob& j, int64_t n0, int64_t b) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
  transpose16x16(r);
  const int64_t rows = min64(16, j.T - 16 * b);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[i]), bias);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(j.y + (16 * b + i) * j.N + n0), bf16_from_ps(v));
  }
}

// Column blocks [b0, b1) of 16 output columns, every token; the x pairs already packed.
inline void base_product_amx(const BaseJob& j) {
  const int64_t K = j.K, steps = K / 32, blocks = (j.T + 15) / 16;
  const uint32_t* xt = j.xt;
  amx_configure(16, 64, 16);
  alignas(64) float acc[4 * 256];
  for (int64_t nb = j.b0; nb < j.b1; ++nb) {
    const bf16_t* w = j.w + nb * 16 * K;
    const __m512 bias = j.bias != nullptr ? Vec512::load(j.bias + 16 * nb).v : _mm512_setzero_ps();
    // Up to four token blocks per pass, so each W tile is loaded once per four products. More
    // than four (over 64 tokens) read the row block again, from L2 (16 rows x K: 128 KB at
    // K = 4096).
    for (int64_t g = 0; g < blocks; g += 4) {
      const int64_t gb = min64(4, blocks - g);
      const uint32_t* x0 = xt + g * steps * 256;
      _tile_zero(0);
      _tile_zero(3);
      _tile_zero(5);
      _tile_zero(6);
      for (int64_t s = 0; s < steps; ++s) {
        _tile_loadd(1, w + 32 * s, K * 2);
        _tile_loadd(2, x0 + s * 256, 64);
        _tile_dpbf16ps(0, 1, 2);
        if (gb > 1) {
          _tile_loadd(4, x0 + (steps + s) * 256, 64);
          _tile_dpbf16ps(3, 1, 4);
        }
        if (gb > 2) {
          _tile_loadd(2, x0 + (2 * steps + s) * 256, 64);
          _tile_dpbf16ps(5, 1, 2);
        }
        if (gb > 3) {
          _tile_loadd(4, x0 + (3 * steps + s) * 256, 64);
          _tile_dpbf16ps(6, 1, 4);
        }
      }
      _tile_stored(0, acc, 64);
      if (gb > 1) _tile_stored(3, acc + 256, 64);
      if (gb > 2) _tile_stored(5, acc + 512, 64);
      if (gb > 3) _tile_stored(6, acc + 768, 64);
      for (int64_t q = 0; q < gb; ++q) store_base_block(acc + 256 * q, bias, j, 16 * nb, g + q);
    }
  }
  _tile_release();
}
