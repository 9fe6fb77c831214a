// bfloat16 shrink and expand on AMX tiles (MILORA_ISA_LEVEL 4). Included only by
// cpu/lora_kernels.h, inside namespace milora::cpu::MILORA_ISA_NS, after the AVX-512-BF16 code.
//
// Where the base product runs on AMX (oneDNN does, on these CPUs), the LoRA term's few percent
// of the multiply-adds cost a multiple of that on vector units: one TDPBF16PS does 16 x 16 x 32
// products. Token lists of kAmxShrinkMinTokens / kAmxExpandMinTokens or more take the tiles
// for the shrink / expand; shorter ones (decode, bound by reading A and B from memory) keep the
// AVX-512-BF16 code, which reads A and B as stored where the tiles first pack them.
//
// Where the thresholds sit (in-process A/B, 2 threads, bf16 4096 x 4096, R = 16, caches flushed,
// LoRA phases, us, vector code -> tiles; medians of 31 rounds):
//   expand, since it takes 64 columns per step: lists of 16 tokens 30 -> 26 (one adapter),
//     102 -> 86 (four lists of 16), 48 -> 45 (two gathered lists of 16); 32 tokens 48 -> 33;
//     48 tokens 91 -> 52; two lists of 32 84 -> 64; 8-12 tokens within 2 us either way, 4 tokens
//     worse (23 -> 28). So from 16 tokens.
//   shrink: two lists of 32 consecutive tokens 90 -> 61, four 144 -> 89, two of 48 100 -> 59, one
//     of 48 73 -> 59; but one list of 32 split over the threads by K 38-46 -> 45-47, two gathered
//     lists of 32 69 -> 73, and 16 tokens 25 -> 45 (the pack of A costs more than the dot tiles'
//     direct reads). So from 32 tokens: a few us lost on single 32-token lists for 30-40 won
//     on prefill-like ones.
//
// Tiles (palette 1): tmm0 = C (m tokens x 16 float32 sums), tmm1 = the left operand (m tokens
// x up to 32 bfloat16), tmm2 = the right operand in pair layout (up to 16 rows of 16 32-bit
// words, each word the bfloat16 pair (2p, 2p + 1) of the reduced dimension for one column).
// The expand also uses tmm3, tmm5, tmm6 (more C blocks) and tmm4 (a second right operand).
// LDTILECFG zeroes every tile, so a configuration only changes between output blocks.

constexpr int64_t kAmxShrinkMinTokens = 32;
constexpr int64_t kAmxExpandMinTokens = 16;

struct alignas(64) AmxConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// C (tmm0, 3, 5, 6): m x 64 bytes; left operand (tmm1): m x left_bytes; right operands (tmm2, 4):
// right_rows x 64 bytes.
inline void amx_configure(int m, int left_bytes, int right_rows) {
  AmxConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  constexpr int kC[] = {0, 3, 5, 6}, kRight[] = {2, 4};
  for (int t : kC) {
    c.colsb[t] = 64;
    c.rows[t] = static_cast<uint8_t>(m);
  }
  c.colsb[1] = static_cast<uint16_t>(left_bytes);
  c.rows[1] = static_cast<uint8_t>(m);
  for (int t : kRight) {
    c.colsb[t] = 64;
    c.rows[t] = static_cast<uint8_t>(right_rows);
  }
  _tile_loadconfig(&c);
}

// panel[p * ld + r] = the bfloat16 pair (A[r, 2p], A[r, 2p + 1]) as one word, for pairs
// p < np and rows r < ld (rows >= R are 0): A^T in the tiles' pair layout. 8 x 8 blocks of
// words through registers (transpose8x8), the rest word by word.
inline void pack_a_pairs(const bf16_t* a, int64_t K, int64_t R, int64_t np, uint32_t* panel, int64_t ld) {
  const int64_t np8 = np / 8 * 8;
  for (int64_t r0 = 0; r0 < ld; r0 += 8) {
    for (int64_t p0 = 0; p0 < np8; p0 += 8) {
      __m256 v[8];
      for (int q = 0; q < 8; ++q)
        v[q] = r0 + q < R ? _mm256_loadu_ps(reinterpret_cast<const float*>(a + (r0 + q) * K + 2 * p0)) : _mm256_setzero_ps();
      transpose8x8(v);
      for (int m = 0; m < 8; ++m) _mm256_storeu_ps(reinterpret_cast<float*>(panel + (p0 + m) * ld + r0), v[m]);
    }
    for (int64_t p = np8; p < np; ++p)
      for (int64_t r = r0; r < r0 + 8; ++r) {
        uint32_t w = 0;
        if (r < R) std::memcpy(&w, a + r * K + 2 * p, 4);
        panel[p * ld + r] = w;
      }
  }
}

// Packed shrink item on tiles: every expert of the item, tokens [i0, i1), K range [k0, k1)
// (the whole 32-value steps on tiles, the rest of the range in float32 after them).
// Scratch: the experts' pair panels, then 16 gathered x rows when a block's tokens are not
// consecutive rows.
inline void shrink_amx(const ShrinkJob<bf16_t, float>& j) {
  const int64_t K = j.K, E = j.E, R = j.R, Rpad = j.Rpad;
  const int64_t klen = j.k1 - j.k0, k32 = klen / 32 * 32, np = k32 / 2;
  uint32_t* panels = reinterpret_cast<uint32_t*>(j.scratch);  // [ne][np][Rpad]
  bf16_t* gathered = reinterpret_cast<bf16_t*>(panels + j.ne * np * Rpad);  // [16][k32]
  for (int64_t q = 0; q < j.ne; ++q)
    pack_a_pairs(j.a + j.experts[q] * R * K + j.k0, K, R, np, panels + q * np * Rpad, Rpad);
  alignas(64) float c[16 * 16];
  int configured = 0;
  for (int64_t i = j.i0; i < j.i1; i += 16) {
    const int m = static_cast<int>(min64(16, j.i1 - i));
    const int64_t* tok = j.tokens + i;
    const bf16_t* xs;
    int64_t x_stride;  // bytes
    if (tok[m - 1] - tok[0] == m - 1) {  // ascending lists: consecutive rows
      xs = j.x + tok[0] * K + j.k0;
      x_stride = K * 2;
    } else {
      for (int row = 0; row < m; ++row) std::memcpy(gathered + row * k32, j.x + tok[row] * K + j.k0, k32 * 2);
      xs = gathered;
      x_stride = k32 * 2;
    }
    if (m != configured && k32 > 0) {
      amx_configure(m, 64, 16);
      configured = m;
    }
    for (int64_t q = 0; q < j.ne; ++q) {
      const int64_t e = j.experts[q];
      const bf16_t* a_rows = j.a + e * R * K;
      for (int64_t rb = 0; rb < Rpad; rb += 16) {
        if (k32 > 0) {
          _tile_zero(0);
          const uint32_t* pb = panels + q * np * Rpad + rb;
          for (int64_t kk = 0; kk < k32; kk += 32) {
            _tile_loadd(1, xs + kk, x_stride);
            _tile_loadd(2, pb + (kk / 2) * Rpad, Rpad * 4);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, c, 64);
        } else {
          std::memset(c, 0, sizeof(c));
        }
        for (int row = 0; row < m; ++row) {
          float* out = j.out + (tok[row] * E + e) * Rpad + rb;
          const bf16_t* xr = j.x + tok[row] * K;
          for (int col = 0; col < 16; ++col) {
            float sum = c[row * 16 + col];
            const int64_t r = rb + col;
            if (r < R)
              for (int64_t k = j.k0 + k32; k < j.k1; ++k) sum += widen(xr[k]) * widen(a_rows[r * K + k]);
            out[col] = r < R ? sum : 0.0f;
          }
        }
      }
    }
  }
  if (configured) _tile_release();
}

// One token list's expand on tiles (kAmxExpandMinTokens tokens or more; fewer: expand_list_bf16).
// The left operand is the tokens' U rows rounded to bfloat16 pairs, all experts' ranks in a
// row (kp pairs, padded with 0 to a multiple of 16 when longer than 16, so one configuration
// serves every step); the right one B's pair panel of pack_b_pairs, whose expert rows are
// stacked the same way. Scratch: expand_list_scratch values.
inline void expand_list_amx(const ExpandJob<bf16_t, float>& j) {
  if (j.ntokens < kAmxExpandMinTokens) return expand_list_bf16(j);
  const int64_t E = j.E, Rpad = j.Rpad, N = j.N, R2 = (j.R + 1) / 2, nexp = j.nexperts;
  const int64_t cols = j.n1 - j.n0, ld = round_up64(cols, 32);
  const int64_t kp = nexp * R2, kp_pad = kp <= 16 ? kp : round_up64(kp, 16), step = min64(16, kp_pad);
  uint32_t* panel = reinterpret_cast<uint32_t*>(j.scratch);  // [kp_pad][ld]
  uint32_t* uw = panel + kp_pad * ld;                         // [16][kp_pad]
  pack_b_pairs(j, panel, ld);
  for (int64_t p = kp; p < kp_pad; ++p)
    for (int64_t c = 0; c < ld; ++c) panel[p * ld + c] = 0u;
  alignas(64) float acc[4 * 16 * 16];  // four C blocks of m x 16
  int configured = 0;
  for (int64_t i0 = 0; i0 < j.ntokens; i0 += 16) {
    const int m = static_cast<int>(min64(16, j.ntokens - i0));
    for (int row = 0; row < m; ++row) {
      const int64_t t = j.tokens[i0 + row];
      uint32_t* w = uw + row * kp_pad;
      for (int64_t q = 0; q < nexp; ++q) {
        const float* u = j.u + (t * E + j.experts[q]) * Rpad;  // pad lanes 0: an odd R's last pair is (u, 0)
        int64_t r2 = 0;
        for (; 2 * r2 + 16 <= j.R; r2 += 8)  // 16 values at once, rounded as _mm512_cvtneps_pbh does
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + q * R2 + r2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(u + 2 * r2)));
        for (; r2 < R2; ++r2)
          w[q * R2 + r2] = static_cast<uint32_t>(float_to_bf16(u[2 * r2])) | (static_cast<uint32_t>(float_to_bf16(u[2 * r2 + 1])) << 16);
      }
      for (int64_t p = kp; p < kp_pad; ++p) w[p] = 0u;
    }
    if (m != configured) {
      amx_configure(m, static_cast<int>(step * 4), static_cast<int>(step));
      configured = m;
    }
    // 64 columns (four C blocks) per step, so each y row is read, added to and written 128 bytes
    // at a time: whole cache lines. With one 16-column block per step each line was touched twice,
    // 15 rows apart, and rows N apart share L1 sets (N = 4096: every row in one set), so the second
    // touch often missed. Expand phase, in-process A/B, 2 threads, caches flushed: 2048 tokens
    // 2.1-2.2 -> 1.7-1.8 ms, 256 tokens 271 -> 221 us, 64 tokens 72 -> 62 us.
    for (int64_t c = 0; c < cols; c += 64) {
      const int64_t blocks = min64(4, (cols - c + 15) / 16);  // the panel's ld covers whole blocks
      const uint32_t* pb = panel + c;
      _tile_zero(0);
      _tile_zero(3);
      _tile_zero(5);
      _tile_zero(6);
      for (int64_t p0 = 0; p0 < kp_pad; p0 += step) {
        _tile_loadd(1, uw + p0, kp_pad * 4);
        _tile_loadd(2, pb + p0 * ld, ld * 4);
        _tile_dpbf16ps(0, 1, 2);
        if (blocks > 1) {
          _tile_loadd(4, pb + p0 * ld + 16, ld * 4);
          _tile_dpbf16ps(3, 1, 4);
        }
        if (blocks > 2) {
          _tile_loadd(2, pb + p0 * ld + 32, ld * 4);
          _tile_dpbf16ps(5, 1, 2);
        }
        if (blocks > 3) {
          _tile_loadd(4, pb + p0 * ld + 48, ld * 4);
          _tile_dpbf16ps(6, 1, 4);
        }
      }
      _tile_stored(0, acc, 64);
      if (blocks > 1) _tile_stored(3, acc + 256, 64);
      if (blocks > 2) _tile_stored(5, acc + 512, 64);
      if (blocks > 3) _tile_stored(6, acc + 768, 64);
      for (int row = 0; row < m; ++row) {
        bf16_t* yr = j.y + j.tokens[i0 + row] * N + j.n0 + c;
        for (int64_t b = 0; b < blocks; ++b)
          Vec512{_mm512_load_ps(acc + b * 256 + row * 16)}.add_to(yr + 16 * b, static_cast<int>(min64(16, cols - c - 16 * b)));
      }
    }
  }
  _tile_release();
}
