#include "kv-scores.cuh"
#include "convert.cuh"

#include <cinttypes>

// GGML_OP_KV_SCORES: eviction scores of the KV cache cells (see ggml_kv_scores in ggml.h)
//
// The query vectors of KV head hkv are its n_grp query heads times the n_rows query rows,
// iq = g*n_rows + r (query head h = hkv*n_grp + g). The logits s[iq, j] = cap(scale*q[iq].k[j]) + mask[r, j]
// are computed in tiles of KV_SCORES_NQ query vectors x KV_SCORES_NC cells: 256 threads, each a 4x4
// micro-tile, the head dimension staged through shared memory in slices of KV_SCORES_DS (as an SGEMM
// would). K is converted to F32 when it is staged. Two ways, the same results bit for bit:
//
// stored logits (the logits of the op fit in KV_SCORES_MAX_STORED bytes of pool memory, n_grp <= 32):
//   pass 1 (kv_scores_stats<store>): grid (cell tiles, query tiles, KV heads): the logits into the pool,
//                               and per query vector the max and sum of exp over the tile's cells
//   combine (kv_scores_combine): one warp per (KV head, query vector): merge the partials -> max M and
//                               coefficient row_w[r]/sum (0 for a fully masked row or a row of weight 0)
//   pass 2 (kv_scores_reduce_stored): block (32 cells, n_grp query heads) per KV head: thread (cell, g)
//                               reduces p = exp(s - M)*coef over the rows of query head g, then g = 0
//                               reduces over the group
// recomputed logits (long caches, where the stored logits would take too much memory):
//   pass 1 (kv_scores_stats):   grid (cell tiles, 1, KV heads), each block looping over the query tiles
//   combine                     as above
//   pass 2 (kv_scores_reduce):  grid (cell tiles, KV heads): recompute the logits, p = exp(s - M)*coef,
//                               reduce over the rows of each query head, then over the group, write out
// Decode-time evictions score C + S cells with 4*32 query vectors per KV head: the first way gives the
// GPU (cell tiles x query tiles x KV heads) blocks and does the Q.K products once instead of twice.
//
// Every reduction runs in a fixed order: the result does not depend on scheduling.
// A cell tile that every mask row masks (an eviction's protected cells, kept together) skips the products in both
// passes: its logits are -INF, its partials empty, its scores 0.

static constexpr int KV_SCORES_NC = 64;  // cells per tile (one block)
static constexpr int KV_SCORES_NQ = 64;  // query vectors per tile
static constexpr int KV_SCORES_DS = 32;  // head dimension slice staged in shared memory
static constexpr int KV_SCORES_NT = 256; // threads per block, 16 x 16, each 4 query vectors x 4 cells
static constexpr int KV_SCORES_TW = 16;  // threads along each side of the tile

static constexpr size_t KV_SCORES_MAX_STORED = 64u*1024*1024; // pool bytes for the stored logits

static_assert(KV_SCORES_NQ == 4*KV_SCORES_TW && KV_SCORES_NC == 4*KV_SCORES_TW, "bad tile");
static_assert(KV_SCORES_NT == KV_SCORES_TW*KV_SCORES_TW, "bad block");
static_assert(KV_SCORES_NC <= KV_SCORES_NT, "pass 2 reduces one cell per thread");

struct kv_scores_params {
    const float * q;
    const char  * k;
    const float * mask;  // nullptr: no mask
    const float * row_w; // nullptr: all rows weigh 1
    float       * dst;

    int64_t nbq1;  // bytes between query heads
    int64_t nbq2;  // bytes between query rows
    int64_t nbk1;  // bytes between cells
    int64_t nbk2;  // bytes between KV heads
    int64_t nbm1;  // bytes between mask rows (0: one row for all)

    int   n_kv;
    int   n_rows;
    int   n_grp;
    int   n_q;     // n_grp*n_rows
    int   n_tiles; // cell tiles
    float scale;   // scale/softcap with soft-capping
    float softcap; // 0: none
    int   red_row;
    int   red_grp;
};

template <ggml_type type_k>
static __device__ __forceinline__ float kv_scores_k_elem(const char * row, const int i) {
    if constexpr (type_k == GGML_TYPE_F32) {
        return ((const float *) row)[i];
    } else if constexpr (type_k == GGML_TYPE_F16) {
        return __half2float(((const half *) row)[i]);
    } else if constexpr (type_k == GGML_TYPE_BF16) {
        return ggml_cuda_cast<float>(((const nv_bfloat16 *) row)[i]);
    } else if constexpr (type_k == GGML_TYPE_Q8_0) {
        const block_q8_0 * b = (const block_q8_0 *) row + i/QK8_0;
        return __half2float(b->d)*b->qs[i % QK8_0];
    } else if constexpr (type_k == GGML_TYPE_Q4_0 || type_k == GGML_TYPE_Q4_1 || type_k == GGML_TYPE_Q5_0 ||
                         type_k == GGML_TYPE_Q5_1 || type_k == GGML_TYPE_IQ4_NL) {
        // 32 values per block: value j in the low nibble of qs[j] for j < 16, in the high nibble of qs[j - 16]
        // after; Q5_*: the 5th bit is bit j of qh
        const int j = i % 32;
        if constexpr (type_k == GGML_TYPE_Q4_0) {
            const block_q4_0 * b = (const block_q4_0 *) row + i/QK4_0;
            const int q = j < 16 ? b->qs[j] & 0x0F : b->qs[j - 16] >> 4;
            return __half2float(b->d)*(q - 8);
        } else if constexpr (type_k == GGML_TYPE_Q4_1) {
            const block_q4_1 * b = (const block_q4_1 *) row + i/QK4_1;
            const int q = j < 16 ? b->qs[j] & 0x0F : b->qs[j - 16] >> 4;
            const float2 dm = __half22float2(b->dm);
            return dm.x*q + dm.y;
        } else if constexpr (type_k == GGML_TYPE_Q5_0) {
            const block_q5_0 * b = (const block_q5_0 *) row + i/QK5_0;
            const int q = (j < 16 ? b->qs[j] & 0x0F : b->qs[j - 16] >> 4) | (((b->qh[j/8] >> (j % 8)) & 1) << 4);
            return __half2float(b->d)*(q - 16);
        } else if constexpr (type_k == GGML_TYPE_Q5_1) {
            const block_q5_1 * b = (const block_q5_1 *) row + i/QK5_1;
            const int q = (j < 16 ? b->qs[j] & 0x0F : b->qs[j - 16] >> 4) | (((b->qh[j/8] >> (j % 8)) & 1) << 4);
            const float2 dm = __half22float2(b->dm);
            return dm.x*q + dm.y;
        } else {
            const block_iq4_nl * b = (const block_iq4_nl *) row + i/QK4_NL;
            const int q = j < 16 ? b->qs[j] & 0x0F : b->qs[j - 16] >> 4;
            return __half2float(b->d)*kvalues_iq4nl[q];
        }
    } else {
        static_assert(type_k == GGML_TYPE_F32, "unsupported K type");
        return 0.0f;
    }
}

static __device__ __forceinline__ float kv_scores_red(const float a, const float b, const int op) {
    return op == GGML_KV_SCORES_REDUCE_MAX ? fmaxf(a, b) : a + b;
}

// (m, l) <- (m, l) merged with (m2, l2): running max and sum of exp(x - max)
static __device__ __forceinline__ void kv_scores_merge(float & m, float & l, const float m2, const float l2) {
    const float mn = fmaxf(m, m2);
    if (mn == -INFINITY) {
        return; // both empty
    }
    l = l*expf(m - mn) + l2*expf(m2 - mn);
    m = mn;
}

// logits of the query tile qt against the block's cell tile (unscaled, unmasked) into s
template <int D, ggml_type type_k>
static __device__ __forceinline__ void kv_scores_qk_tile(
        const kv_scores_params & p, const int hkv, const int c0, const int qt,
        float (&q_sh)[KV_SCORES_DS][KV_SCORES_NQ + 1], float (&k_sh)[KV_SCORES_DS][KV_SCORES_NC + 1],
        float (&s)[4][4]) {
    const int tid = threadIdx.x;
    const int tx  = tid % KV_SCORES_TW; // cells tx + 16*n
    const int ty  = tid / KV_SCORES_TW; // query vectors ty + 16*m

#pragma unroll
    for (int m = 0; m < 4; ++m) {
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            s[m][n] = 0.0f;
        }
    }

    const char * k_head = p.k + hkv*p.nbk2;

#pragma unroll
    for (int d0 = 0; d0 < D; d0 += KV_SCORES_DS) {
        __syncthreads(); // the previous slice (or the previous epilogue) is done with the shared buffers

        // consecutive threads read consecutive elements of one vector; the +1 padding keeps the transposed
        // stores free of bank conflicts
#pragma unroll
        for (int e = tid; e < KV_SCORES_DS*KV_SCORES_NQ; e += KV_SCORES_NT) {
            const int il = e / KV_SCORES_DS;
            const int i  = e % KV_SCORES_DS;
            const int iq = qt*KV_SCORES_NQ + il;
            float v = 0.0f;
            if (iq < p.n_q) {
                const int g = iq / p.n_rows;
                const int r = iq % p.n_rows;
                const float * q_row = (const float *) ((const char *) p.q + (int64_t) (hkv*p.n_grp + g)*p.nbq1 + (int64_t) r*p.nbq2);
                v = q_row[d0 + i];
            }
            q_sh[i][il] = v;
        }
#pragma unroll
        for (int e = tid; e < KV_SCORES_DS*KV_SCORES_NC; e += KV_SCORES_NT) {
            const int c = e / KV_SCORES_DS;
            const int i = e % KV_SCORES_DS;
            const int j = c0 + c;
            k_sh[i][c] = j < p.n_kv ? kv_scores_k_elem<type_k>(k_head + (int64_t) j*p.nbk1, d0 + i) : 0.0f;
        }

        __syncthreads();

#pragma unroll
        for (int i = 0; i < KV_SCORES_DS; ++i) {
            float a[4];
            float b[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                a[m] = q_sh[i][ty + KV_SCORES_TW*m];
            }
#pragma unroll
            for (int n = 0; n < 4; ++n) {
                b[n] = k_sh[i][tx + KV_SCORES_TW*n];
            }
#pragma unroll
            for (int m = 0; m < 4; ++m) {
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    s[m][n] = fmaf(a[m], b[n], s[m][n]);
                }
            }
        }
    }
}

// scaled and masked logit of query vector iq and cell j (-INF outside the tensors)
static __device__ __forceinline__ float kv_scores_logit(const kv_scores_params & p, const float s, const int iq, const int j) {
    if (iq >= p.n_q || j >= p.n_kv) {
        return -INFINITY;
    }
    float x = s*p.scale;
    if (p.softcap > 0.0f) {
        x = p.softcap*tanhf(x); // p.scale holds scale/softcap
    }
    if (p.mask) {
        const int r = iq % p.n_rows;
        x += ((const float *) ((const char *) p.mask + (int64_t) r*p.nbm1))[j];
    }
    return x;
}

// whether some mask row sees a cell of [c0, c0 + KV_SCORES_NC) (no mask: yes); every thread of the block gets the answer
static __device__ __forceinline__ bool kv_scores_tile_seen(const kv_scores_params & p, const int c0) {
    if (!p.mask) {
        return true;
    }
    const int n_mrows = p.nbm1 == 0 ? 1 : p.n_rows;
    int seen = 0;
    for (int e = threadIdx.x; e < n_mrows*KV_SCORES_NC; e += blockDim.x) {
        const int r = e / KV_SCORES_NC;
        const int j = c0 + e % KV_SCORES_NC;
        if (j < p.n_kv && ((const float *) ((const char *) p.mask + (int64_t) r*p.nbm1))[j] != -INFINITY) {
            seen = 1;
        }
    }
    return __syncthreads_or(seen) != 0;
}

// pass 1: per (KV head, query vector, cell tile): max and sum of exp of the logits; store_logits: also the
// logits, one query tile per block, [n_hkv, n_q, n_kv]
template <int D, ggml_type type_k, bool store_logits>
static __global__ void __launch_bounds__(KV_SCORES_NT) kv_scores_stats(const kv_scores_params p, float2 * __restrict__ part,
        float * __restrict__ logits) {
    __shared__ float q_sh[KV_SCORES_DS][KV_SCORES_NQ + 1];
    __shared__ float k_sh[KV_SCORES_DS][KV_SCORES_NC + 1];

    const int tile = blockIdx.x;
    const int hkv  = blockIdx.z;
    const int c0   = tile*KV_SCORES_NC;
    const int tx   = threadIdx.x % KV_SCORES_TW;
    const int ty   = threadIdx.x / KV_SCORES_TW;

    const int n_qt = (p.n_q + KV_SCORES_NQ - 1)/KV_SCORES_NQ;
    const int qt0  = store_logits ? blockIdx.y     : 0;
    const int qt1  = store_logits ? blockIdx.y + 1 : n_qt;

    if (!kv_scores_tile_seen(p, c0)) {
        // every row masks the tile (an eviction's protected cells): no products, logits -INF, empty partials
        for (int qt = qt0; qt < qt1; ++qt) {
            for (int e = threadIdx.x; e < KV_SCORES_NQ*KV_SCORES_NC; e += KV_SCORES_NT) {
                const int iq = qt*KV_SCORES_NQ + e / KV_SCORES_NC;
                const int j  = c0 + e % KV_SCORES_NC;
                if (iq < p.n_q && j < p.n_kv) {
                    if (store_logits) {
                        logits[((int64_t) hkv*p.n_q + iq)*p.n_kv + j] = -INFINITY;
                    }
                    if (j == c0) {
                        part[((int64_t) hkv*p.n_q + iq)*p.n_tiles + tile] = make_float2(-INFINITY, 0.0f);
                    }
                }
            }
        }
        return;
    }

    for (int qt = qt0; qt < qt1; ++qt) {
        float s[4][4];
        kv_scores_qk_tile<D, type_k>(p, hkv, c0, qt, q_sh, k_sh, s);

#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int iq = qt*KV_SCORES_NQ + ty + KV_SCORES_TW*m;

            float x[4];
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < 4; ++n) {
                x[n] = kv_scores_logit(p, s[m][n], iq, c0 + tx + KV_SCORES_TW*n);
                mx = fmaxf(mx, x[n]);
            }
            if (store_logits && iq < p.n_q) {
                float * l = logits + ((int64_t) hkv*p.n_q + iq)*p.n_kv;
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    const int j = c0 + tx + KV_SCORES_TW*n;
                    if (j < p.n_kv) {
                        l[j] = x[n];
                    }
                }
            }
            // the 16 threads of a query vector are 16 consecutive lanes of one warp
#pragma unroll
            for (int off = KV_SCORES_TW/2; off > 0; off >>= 1) {
                mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFF, mx, off, WARP_SIZE));
            }
            float l = 0.0f;
            if (mx != -INFINITY) {
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    l += expf(x[n] - mx);
                }
            }
#pragma unroll
            for (int off = KV_SCORES_TW/2; off > 0; off >>= 1) {
                l += __shfl_xor_sync(0xFFFFFFFF, l, off, WARP_SIZE);
            }
            if (tx == 0 && iq < p.n_q) {
                part[((int64_t) hkv*p.n_q + iq)*p.n_tiles + tile] = make_float2(mx, l);
            }
        }
    }
}

// one warp per (KV head, query vector): merge the partials of every cell tile
static __global__ void kv_scores_combine(const kv_scores_params p, const float2 * __restrict__ part, float2 * __restrict__ stats, const int n_total) {
    const int idx  = blockIdx.x*(blockDim.x/WARP_SIZE) + threadIdx.x/WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;
    if (idx >= n_total) {
        return;
    }

    float m = -INFINITY;
    float l = 0.0f;
    for (int t = lane; t < p.n_tiles; t += WARP_SIZE) {
        const float2 v = part[(int64_t) idx*p.n_tiles + t];
        kv_scores_merge(m, l, v.x, v.y);
    }
#pragma unroll
    for (int off = WARP_SIZE/2; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xFFFFFFFF, m, off, WARP_SIZE);
        const float l2 = __shfl_xor_sync(0xFFFFFFFF, l, off, WARP_SIZE);
        kv_scores_merge(m, l, m2, l2);
    }

    if (lane == 0) {
        const int   r = idx % p.n_rows; // idx = hkv*n_q + g*n_rows + r
        const float w = p.row_w ? p.row_w[r] : 1.0f;
        // a fully masked row contributes 0: every logit is -INF, exp(-INF - 0)*0 = 0
        // a row of weight 0 keeps its max so that exp(x - max) <= 1 stays finite
        stats[idx] = m == -INFINITY ? make_float2(0.0f, 0.0f) : make_float2(m, w/l);
    }
}

// pass 2: probabilities, reduced over the rows of each query head, then over the query heads of the group
template <int D, ggml_type type_k>
static __global__ void __launch_bounds__(KV_SCORES_NT) kv_scores_reduce(const kv_scores_params p, const float2 * __restrict__ stats) {
    __shared__ float q_sh[KV_SCORES_DS][KV_SCORES_NQ + 1];
    __shared__ float k_sh[KV_SCORES_DS][KV_SCORES_NC + 1];
    __shared__ float p_sh[KV_SCORES_NQ][KV_SCORES_NC + 1];

    const int tid = threadIdx.x;
    const int hkv = blockIdx.y;
    const int c0  = blockIdx.x*KV_SCORES_NC;
    const int tx  = tid % KV_SCORES_TW;
    const int ty  = tid / KV_SCORES_TW;

    const int n_qt = (p.n_q + KV_SCORES_NQ - 1)/KV_SCORES_NQ;

    const float init_row = p.red_row == GGML_KV_SCORES_REDUCE_MAX ? -INFINITY : 0.0f;
    const float init_grp = p.red_grp == GGML_KV_SCORES_REDUCE_MAX ? -INFINITY : 0.0f;

    if (!kv_scores_tile_seen(p, c0)) {
        // every probability of the tile is 0: so are its sums and maxima
        if (tid < KV_SCORES_NC && c0 + tid < p.n_kv) {
            p.dst[(int64_t) hkv*p.n_kv + c0 + tid] = 0.0f;
        }
        return;
    }

    // threads tid < KV_SCORES_NC own cell c0 + tid for the reductions
    float acc_row = init_row;
    float acc_grp = init_grp;
    int   cur_g   = 0;

    for (int qt = 0; qt < n_qt; ++qt) {
        float s[4][4];
        kv_scores_qk_tile<D, type_k>(p, hkv, c0, qt, q_sh, k_sh, s);

#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int    iq = qt*KV_SCORES_NQ + ty + KV_SCORES_TW*m;
            const float2 st = iq < p.n_q ? stats[(int64_t) hkv*p.n_q + iq] : make_float2(0.0f, 0.0f);
#pragma unroll
            for (int n = 0; n < 4; ++n) {
                const float x = kv_scores_logit(p, s[m][n], iq, c0 + tx + KV_SCORES_TW*n);
                p_sh[ty + KV_SCORES_TW*m][tx + KV_SCORES_TW*n] = expf(x - st.x)*st.y;
            }
        }

        __syncthreads();

        // rows in order: the reduction order is fixed. The next tile's first __syncthreads in
        // kv_scores_qk_tile keeps p_sh from being overwritten before these reads are done.
        if (tid < KV_SCORES_NC) {
            const int nl = min(KV_SCORES_NQ, p.n_q - qt*KV_SCORES_NQ);
            for (int il = 0; il < nl; ++il) {
                const int g = (qt*KV_SCORES_NQ + il) / p.n_rows;
                if (g != cur_g) {
                    acc_grp = kv_scores_red(acc_grp, acc_row, p.red_grp);
                    acc_row = init_row;
                    cur_g   = g;
                }
                acc_row = kv_scores_red(acc_row, p_sh[il][tid], p.red_row);
            }
        }
    }

    if (tid < KV_SCORES_NC) {
        acc_grp = kv_scores_red(acc_grp, acc_row, p.red_grp);
        const int j = c0 + tid;
        if (j < p.n_kv) {
            p.dst[(int64_t) hkv*p.n_kv + j] = acc_grp;
        }
    }
}

// pass 2 with the logits stored: thread (lane, g) of the block of KV head blockIdx.y reduces the
// probabilities of cell blockIdx.x*32 + lane over the rows of query head g, in order; then the threads
// g = 0 reduce over the group, in order (the same order as kv_scores_reduce)
static __global__ void kv_scores_reduce_stored(const kv_scores_params p, const float2 * __restrict__ stats,
        const float * __restrict__ logits) {
    __shared__ float acc_sh[WARP_SIZE][WARP_SIZE + 1]; // [g][lane], n_grp <= 32

    const int lane = threadIdx.x;
    const int g    = threadIdx.y;
    const int hkv  = blockIdx.y;
    const int j    = blockIdx.x*WARP_SIZE + lane;

    float acc = p.red_row == GGML_KV_SCORES_REDUCE_MAX ? -INFINITY : 0.0f;
    if (j < p.n_kv) {
        const int      iq0 = g*p.n_rows;
        const float  * l   = logits + ((int64_t) hkv*p.n_q + iq0)*p.n_kv + j;
        const float2 * st  = stats  +  (int64_t) hkv*p.n_q + iq0;
#pragma unroll 8
        for (int r = 0; r < p.n_rows; ++r) {
            const float2 sr = st[r];
            acc = kv_scores_red(acc, expf(l[(int64_t) r*p.n_kv] - sr.x)*sr.y, p.red_row);
        }
    }
    acc_sh[g][lane] = acc;

    __syncthreads();

    if (g == 0 && j < p.n_kv) {
        float acc_grp = p.red_grp == GGML_KV_SCORES_REDUCE_MAX ? -INFINITY : 0.0f;
        for (int gg = 0; gg < p.n_grp; ++gg) {
            acc_grp = kv_scores_red(acc_grp, acc_sh[gg][lane], p.red_grp);
        }
        p.dst[(int64_t) hkv*p.n_kv + j] = acc_grp;
    }
}

// logits: pool memory for [n_hkv, n_q, n_kv] stored logits, or nullptr to recompute them in pass 2
template <int D, ggml_type type_k>
static void kv_scores_launch(const kv_scores_params & p, const int n_hkv, float2 * part, float2 * stats, float * logits,
        cudaStream_t stream) {
    const int n_qt = (p.n_q + KV_SCORES_NQ - 1)/KV_SCORES_NQ;

    if (logits) {
        kv_scores_stats<D, type_k, true><<<dim3(p.n_tiles, n_qt, n_hkv), KV_SCORES_NT, 0, stream>>>(p, part, logits);
    } else {
        kv_scores_stats<D, type_k, false><<<dim3(p.n_tiles, 1, n_hkv), KV_SCORES_NT, 0, stream>>>(p, part, nullptr);
    }
    CUDA_CHECK(cudaGetLastError());

    const int n_total = n_hkv*p.n_q;
    const int warps_per_block = 8;
    kv_scores_combine<<<(n_total + warps_per_block - 1)/warps_per_block, warps_per_block*WARP_SIZE, 0, stream>>>(p, part, stats, n_total);
    CUDA_CHECK(cudaGetLastError());

    if (logits) {
        const dim3 grid((p.n_kv + WARP_SIZE - 1)/WARP_SIZE, n_hkv, 1);
        kv_scores_reduce_stored<<<grid, dim3(WARP_SIZE, p.n_grp, 1), 0, stream>>>(p, stats, logits);
    } else {
        kv_scores_reduce<D, type_k><<<dim3(p.n_tiles, n_hkv, 1), KV_SCORES_NT, 0, stream>>>(p, stats);
    }
    CUDA_CHECK(cudaGetLastError());
}

template <int D>
static void kv_scores_launch_type(const ggml_type type_k, const kv_scores_params & p, const int n_hkv, float2 * part,
        float2 * stats, float * logits, cudaStream_t stream) {
    switch (type_k) {
        case GGML_TYPE_F32:  kv_scores_launch<D, GGML_TYPE_F32> (p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_F16:  kv_scores_launch<D, GGML_TYPE_F16> (p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_BF16: kv_scores_launch<D, GGML_TYPE_BF16>(p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_Q8_0: kv_scores_launch<D, GGML_TYPE_Q8_0>(p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_Q4_0: kv_scores_launch<D, GGML_TYPE_Q4_0>(p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_Q4_1: kv_scores_launch<D, GGML_TYPE_Q4_1>(p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_Q5_0: kv_scores_launch<D, GGML_TYPE_Q5_0>(p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_Q5_1: kv_scores_launch<D, GGML_TYPE_Q5_1>(p, n_hkv, part, stats, logits, stream); break;
        case GGML_TYPE_IQ4_NL: kv_scores_launch<D, GGML_TYPE_IQ4_NL>(p, n_hkv, part, stats, logits, stream); break;
        default: GGML_ABORT("kv_scores: unsupported K type %s", ggml_type_name(type_k));
    }
}

void ggml_cuda_op_kv_scores(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * mask  = dst->src[2];
    const ggml_tensor * row_w = dst->src[3];

    GGML_ASSERT(ggml_cuda_kv_scores_supported(dst));
    GGML_ASSERT(ggml_is_contiguous(dst));

    const int64_t d      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_rows = q->ne[2];
    const int64_t n_kv   = k->ne[1];
    const int64_t n_hkv  = k->ne[2];

    GGML_ASSERT(n_kv < INT_MAX && n_head*n_rows < INT_MAX);

    kv_scores_params p;
    p.q     = (const float *) q->data;
    p.k     = (const char  *) k->data;
    p.mask  = mask  ? (const float *) mask->data  : nullptr;
    p.row_w = row_w ? (const float *) row_w->data : nullptr;
    p.dst   = (float *) dst->data;

    p.nbq1 = q->nb[1];
    p.nbq2 = q->nb[2];
    p.nbk1 = k->nb[1];
    p.nbk2 = k->nb[2];
    p.nbm1 = mask && mask->ne[1] > 1 ? mask->nb[1] : 0;

    p.n_kv    = (int) n_kv;
    p.n_rows  = (int) n_rows;
    p.n_grp   = (int) (n_head/n_hkv);
    p.n_q     = (int) (p.n_grp*n_rows);
    p.n_tiles = (int) ((n_kv + KV_SCORES_NC - 1)/KV_SCORES_NC);
    p.softcap = ggml_get_op_params_f32(dst, 3);
    p.scale   = p.softcap > 0.0f ? ggml_get_op_params_f32(dst, 0)/p.softcap : ggml_get_op_params_f32(dst, 0);
    p.red_row = ggml_get_op_params_i32(dst, 1);
    p.red_grp = ggml_get_op_params_i32(dst, 2);

    if (n_kv == 0) {
        return;
    }

    ggml_cuda_pool_alloc<float2> part (ctx.pool(), (size_t) n_hkv*p.n_q*p.n_tiles);
    ggml_cuda_pool_alloc<float2> stats(ctx.pool(), (size_t) n_hkv*p.n_q);

    // the logits are stored between the passes when they fit (decode-time evictions: a few MiB per layer),
    // otherwise pass 2 recomputes them
    const size_t n_logits = (size_t) n_hkv*p.n_q*n_kv;
    ggml_cuda_pool_alloc<float> logits(ctx.pool());
    if (p.n_grp <= WARP_SIZE && n_logits*sizeof(float) <= KV_SCORES_MAX_STORED) {
        logits.alloc(n_logits);
    }

    cudaStream_t stream = ctx.stream();

    switch (d) {
        case  64: kv_scores_launch_type< 64>(k->type, p, (int) n_hkv, part.get(), stats.get(), logits.ptr, stream); break;
        case  96: kv_scores_launch_type< 96>(k->type, p, (int) n_hkv, part.get(), stats.get(), logits.ptr, stream); break;
        case 128: kv_scores_launch_type<128>(k->type, p, (int) n_hkv, part.get(), stats.get(), logits.ptr, stream); break;
        case 256: kv_scores_launch_type<256>(k->type, p, (int) n_hkv, part.get(), stats.get(), logits.ptr, stream); break;
        default: GGML_ABORT("kv_scores: unsupported head size %" PRId64, d);
    }
}

bool ggml_cuda_kv_scores_supported(const ggml_tensor * op) {
    const ggml_tensor * q     = op->src[0];
    const ggml_tensor * k     = op->src[1];
    const ggml_tensor * mask  = op->src[2];
    const ggml_tensor * row_w = op->src[3];

    if (q->ne[0] != 64 && q->ne[0] != 96 && q->ne[0] != 128 && q->ne[0] != 256) {
        return false; // the composed graph covers the other head sizes
    }
    switch (k->type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0:
        case GGML_TYPE_Q4_0:
        case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0:
        case GGML_TYPE_Q5_1:
        case GGML_TYPE_IQ4_NL:
            break;
        default:
            return false;
    }
    if (q->type != GGML_TYPE_F32 || q->nb[0] != sizeof(float) || k->nb[0] != ggml_type_size(k->type)) {
        return false;
    }
    if (mask && (mask->type != GGML_TYPE_F32 || mask->nb[0] != sizeof(float))) {
        return false;
    }
    if (row_w && (row_w->type != GGML_TYPE_F32 || !ggml_is_contiguous(row_w))) {
        return false;
    }
    return q->ne[3] == 1 && k->ne[3] == 1;
}
