// 4-bit weight products whose cost hardly grows with the row count (1 to 16 rows), on CPUs with
// AMX bfloat16 tiles: the rows of a drafted tree cost about what one row costs. Built on first
// use by blockdraft/int4_tiles.py (torch.utils.cpp_extension).
//
// Weights [N, K] are stored per block of 16 outputs and group of 32 inputs (block_bytes bytes):
// 256 bytes of codes, byte 16p + c holding output c's codes for inputs 2p (low nibble) and 2p + 1
// (high nibble); then the 16 outputs' steps and minimums as float16 (w = code * step + minimum).
//
// Per group, a tile product sums x * code over the group's 32 inputs (codes 0..15 are exact in
// bfloat16; the sums are float32), then each row adds step * sum + minimum * (sum of its 32
// inputs). A row's arithmetic is the same whatever the other rows are, so each row's result is
// the one it gets alone: drafted rows verify exactly as plain decoding computes them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace {
constexpr int64_t COLS = 16;   // outputs per block: one tile's columns
constexpr int64_t GROUP = 32;  // inputs per step and minimum: one tile's depth in bfloat16 pairs
constexpr int64_t CODE_BYTES = GROUP * COLS / 2;
constexpr int64_t BLOCK_BYTES = CODE_BYTES + 2 * COLS * 2;
constexpr int TILE_ROWS = 16;  // rows of x per tile product
constexpr int WIDE = 3;        // output blocks worked on together (their tile products overlap)

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_granted() {
  // Linux hands out AMX state only on request (ARCH_REQ_XCOMP_PERM for XTILEDATA).
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// Tiles: 0 = rows of x (rows x 32 inputs), 1-3 = codes (16 input pairs x 16 outputs), 4-6 = sums.
void configure_tiles(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) {
    cfg.rows[t] = (t >= 1 && t <= 3) ? TILE_ROWS : rows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// bfloat16 of 0..15, looked up by each 16-bit lane's low bits.
alignas(64) const uint16_t CODE_BF16[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                            0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

// One group's codes of 16 outputs as the tile product reads them: row p = bfloat16 pairs (2p, 2p + 1).
inline void decode_codes(const uint8_t* w, uint16_t* tile) {
  const __m512i lut = _mm512_load_si512(CODE_BF16);
  const __m512i nibbles = _mm512_set1_epi32(0x000F000F);
  for (int p = 0; p < GROUP / 2; ++p) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p * COLS)));
    const __m512i pair = _mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), nibbles, 0xA8);  // (b | b << 12) & nibbles
    _mm512_store_si512(tile + p * 32, _mm512_permutexvar_epi16(pair, lut));
  }
}

// Outputs [16 nb, 16 (nb + T)) for M <= 16 rows; x bfloat16 [M, K], xsum [M, G], out bfloat16.
template <int M, int T>
void output_blocks(const uint16_t* x, const float* xsum, int64_t K, int64_t G, const uint8_t* w, int64_t stride,
                   uint16_t* out, int64_t ldo) {
  alignas(64) uint16_t codes[2][T][GROUP * COLS];
  alignas(64) float sums[T][TILE_ROWS * COLS];
  __m512 total[M][T];
  for (int m = 0; m < M; ++m)
    for (int t = 0; t < T; ++t) total[m][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g, w += BLOCK_BYTES) {
    uint16_t(*buf)[GROUP * COLS] = codes[g & 1];
    for (int t = 0; t < T; ++t) decode_codes(w + t * stride, buf[t]);
    _tile_loadd(0, x + g * GROUP, K * 2);
    _tile_zero(4);
    _tile_loadd(1, buf[0], 64);
    _tile_dpbf16ps(4, 0, 1);
    if constexpr (T > 1) {
      _tile_zero(5);
      _tile_loadd(2, buf[1], 64);
      _tile_dpbf16ps(5, 0, 2);
    }
    if constexpr (T > 2) {
      _tile_zero(6);
      _tile_loadd(3, buf[2], 64);
      _tile_dpbf16ps(6, 0, 3);
    }
    _tile_stored(4, sums[0], 64);
    if constexpr (T > 1) _tile_stored(5, sums[1], 64);
    if constexpr (T > 2) _tile_stored(6, sums[2], 64);
    for (int t = 0; t < T; ++t) {
      const uint8_t* wt = w + t * stride;
      const __m512 step = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + CODE_BYTES)));
      const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + CODE_BYTES + 2 * COLS)));
      for (int m = 0; m < M; ++m) {
        total[m][t] = _mm512_fmadd_ps(_mm512_load_ps(sums[t] + m * COLS), step, total[m][t]);
        total[m][t] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * G + g]), low, total[m][t]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int t = 0; t < T; ++t)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * ldo + t * COLS),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(total[m][t])));
}

using BlocksFn = void (*)(const uint16_t*, const float*, int64_t, int64_t, const uint8_t*, int64_t, uint16_t*, int64_t);

template <int T, int... Ms>
constexpr std::array<BlocksFn, sizeof...(Ms)> by_rows(std::integer_sequence<int, Ms...>) {
  return {output_blocks<Ms + 1, T>...};
}

float bf16_to_float(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float v;
  std::memcpy(&v, &wide, 4);
  return v;
}
}  // namespace

bool available() { return amx_granted(); }

int64_t block_bytes() { return BLOCK_BYTES; }

// x bfloat16 [M, K] @ W^T -> bfloat16 [M, N], W stored as `blocks` uint8 [N / 16, K / 32, block_bytes].
torch::Tensor matmul(const torch::Tensor& x, const torch::Tensor& blocks) {
  TORCH_CHECK(amx_granted(), "int4 tiles: this CPU or kernel grants no AMX state");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "int4 tiles: x must be contiguous bfloat16 [rows, inputs]");
  TORCH_CHECK(blocks.dim() == 3 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous() && blocks.size(2) == BLOCK_BYTES, "int4 tiles: bad blocks");
  const int64_t M = x.size(0), K = x.size(1), G = K / GROUP, NB = blocks.size(0), N = NB * COLS;
  TORCH_CHECK(K == blocks.size(1) * GROUP, "int4 tiles: x has ", K, " inputs, the weight ", blocks.size(1) * GROUP);
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<float> xsum(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < GROUP; ++k) s += bf16_to_float(xp[m * K + g * GROUP + k]);
      xsum[m * G + g] = s;
    }
  const float* sp = xsum.data();
  const uint8_t* wp = blocks.data_ptr<uint8_t>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  static const auto wide = by_rows<WIDE>(std::make_integer_sequence<int, TILE_ROWS>{});
  static const auto narrow = by_rows<1>(std::make_integer_sequence<int, TILE_ROWS>{});
  const int64_t stride = G * BLOCK_BYTES;
  at::parallel_for(0, NB, WIDE, [&](int64_t begin, int64_t end) {
    int configured = 0;
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
      const int rows = int(std::min<int64_t>(TILE_ROWS, M - m0));
      if (rows != configured) configure_tiles(configured = rows);
      int64_t nb = begin;
      for (; nb + WIDE <= end; nb += WIDE)
        wide[rows - 1](xp + m0 * K, sp + m0 * G, K, G, wp + nb * stride, stride, op + m0 * N + nb * COLS, N);
      for (; nb < end; ++nb)
        narrow[rows - 1](xp + m0 * K, sp + m0 * G, K, G, wp + nb * stride, stride, op + m0 * N + nb * COLS, N);
    }
    _tile_release();
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("available", &available, "whether the OS grants this process AMX tiles");
  m.def("block_bytes", &block_bytes);
  m.def("matmul", &matmul, "x bfloat16 [M, K] @ W^T for W in 4-bit blocks");
}
