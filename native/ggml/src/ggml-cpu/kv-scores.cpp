// GGML_OP_KV_SCORES on the CPU: the scores of a KV cache's cells under the recent queries, for eviction

#include "ops.h"

#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "simd-gemm.h"
#include "ggml.h"
#include "vec.h"

#include <cmath>
#include <cstring>

// The query vectors are scored in blocks: n_heads query heads of one KV head (a divisor of the group) times
// n_rows of their rows. Each tile of GGML_KV_SCORES_CPU_TILE cells is converted to F32 and transposed once
// per block, then multiplied with the block's query vectors by simd_gemm (as the tiled flash attention
// path does): the products vectorise over the cells, and the fewer blocks, the fewer conversions of K.
// A block's logits (n_heads*n_rows x n_kv) are kept per thread: blocks grow up to about
// GGML_KV_SCORES_CPU_BLOCK floats, and the threads share whole query heads (no two write one head's sums).
static constexpr int64_t GGML_KV_SCORES_CPU_ROWS  = 16;      // rows per block at least (or all of them)
static constexpr int64_t GGML_KV_SCORES_CPU_TILE  = 64;      // cells per K tile
static constexpr int64_t GGML_KV_SCORES_CPU_BLOCK = 1 << 19; // logits per thread (2 MiB) blocks grow to

struct ggml_kv_scores_cpu_blocks {
    int64_t n_heads; // query heads per block (a divisor of n_head/n_head_kv)
    int64_t n_rows;  // rows per block
};

static ggml_kv_scores_cpu_blocks ggml_kv_scores_cpu_blocking(int64_t n_head, int64_t n_hkv, int64_t n_rows, int64_t n_kv, int n_tasks) {
    const int64_t n_grp  = n_head/n_hkv;
    const int64_t rb_min = MIN(n_rows, GGML_KV_SCORES_CPU_ROWS);
    const int64_t limit  = MAX(GGML_KV_SCORES_CPU_BLOCK, rb_min*n_kv);

    // the largest share of the group that still leaves every thread two blocks and fits the limit
    int64_t nh = 1;
    for (int64_t c = n_grp; c > 1; --c) {
        if (n_grp % c == 0 && n_hkv*(n_grp/c) >= 2*(int64_t) n_tasks && c*rb_min*n_kv <= limit) {
            nh = c;
            break;
        }
    }
    const int64_t rb = MIN(n_rows, MAX(rb_min, limit/(nh*MAX(n_kv, 1))));
    return { nh, rb };
}

size_t ggml_cpu_kv_scores_work_size(const ggml_tensor * dst, int n_tasks) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];

    const int64_t d      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_rows = q->ne[2];
    const int64_t n_kv   = k->ne[1];

    const ggml_kv_scores_cpu_blocks b = ggml_kv_scores_cpu_blocking(n_head, k->ne[2], n_rows, n_kv, n_tasks);
    const int64_t nq = b.n_heads*b.n_rows;
    const int64_t nt = GGML_KV_SCORES_CPU_TILE;

    // per query head: its rows reduced; per thread: the logits of a block, one converted K row, the
    // transposed K tile, the block's query vectors and their products with the tile
    return sizeof(float)*(n_head*n_kv + n_tasks*(nq*n_kv + d + d*nt + nq*d + nq*nt + CACHE_LINE_SIZE_F32));
}

static inline float ggml_kv_scores_reduce(float a, float b, int32_t op) {
    return op == GGML_KV_SCORES_REDUCE_MAX ? MAX(a, b) : a + b;
}

void ggml_compute_forward_kv_scores(
        const ggml_compute_params * params,
        ggml_tensor * dst) {

    const ggml_tensor * q     = dst->src[0];
    const ggml_tensor * k     = dst->src[1];
    const ggml_tensor * mask  = dst->src[2];
    const ggml_tensor * row_w = dst->src[3];

    GGML_ASSERT(dst->type == GGML_TYPE_F32 && ggml_is_contiguous(dst));
    GGML_ASSERT(q->type   == GGML_TYPE_F32 && q->nb[0] == sizeof(float));
    GGML_ASSERT(k->nb[0]  == ggml_type_size(k->type));

    const float   softcap = ggml_get_op_params_f32(dst, 3);
    const float   scale   = softcap > 0.0f ? ggml_get_op_params_f32(dst, 0)/softcap : ggml_get_op_params_f32(dst, 0);
    const int32_t red_row = ggml_get_op_params_i32(dst, 1);
    const int32_t red_grp = ggml_get_op_params_i32(dst, 2);

    const int64_t d      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_rows = q->ne[2];
    const int64_t n_kv   = k->ne[1];
    const int64_t n_hkv  = k->ne[2];
    const int64_t n_grp  = n_head/n_hkv;

    const size_t nbm1 = mask && mask->ne[1] > 1 ? mask->nb[1] : 0;

    ggml_to_float_t const k_to_float = ggml_get_type_traits(k->type)->to_float;
    GGML_ASSERT((k->type == GGML_TYPE_F32 || k_to_float) && "kv_scores: unsupported K type");

    const int ith = params->ith;
    const int nth = params->nth;

    const ggml_kv_scores_cpu_blocks b = ggml_kv_scores_cpu_blocking(n_head, n_hkv, n_rows, n_kv, nth);
    const int64_t nh     = b.n_heads;
    const int64_t rb_max = b.n_rows;
    const int64_t nq_max = nh*rb_max;
    const int64_t nt     = GGML_KV_SCORES_CPU_TILE;

    float * acc_all = (float *) params->wdata;                       // [n_kv, n_head]
    float * logits  = acc_all + n_head*n_kv + ith*(nq_max*n_kv + d + d*nt + nq_max*d + nq_max*nt + CACHE_LINE_SIZE_F32);
    float * k_f32   = logits + nq_max*n_kv;  // [d]: one K row
    float * k_tile  = k_f32 + d;             // [d, nt]: the K tile, transposed
    float * q_blk   = k_tile + d*nt;         // [nq, d]: the block's query vectors, (head, row) in order
    float * kq      = q_blk + nq_max*d;      // [nq, nt]: their products with the tile

    const float init_row = red_row == GGML_KV_SCORES_REDUCE_MAX ? -INFINITY : 0.0f;

    // 1. per query head: softmax of every row over the cells, weighted, reduced over the rows in order;
    //    the threads take consecutive sets of nh query heads (of one KV head each)
    const int64_t n_sets = n_head/nh;
    const int64_t ds  = (n_sets + nth - 1)/nth;
    const int64_t is0 = MIN(ds*ith, n_sets);
    const int64_t is1 = MIN(is0 + ds, n_sets);

    for (int64_t is = is0; is < is1; ++is) {
        const int64_t h0  = is*nh;
        const int64_t hkv = h0/n_grp;
        for (int64_t j = 0; j < nh*n_kv; ++j) {
            acc_all[h0*n_kv + j] = init_row;
        }

        for (int64_t r0 = 0; r0 < n_rows; r0 += rb_max) {
            const int64_t rb = MIN(rb_max, n_rows - r0);
            const int64_t nq = nh*rb; // query vector iv = ih*rb + ir: head h0 + ih, row r0 + ir

            for (int64_t iv = 0; iv < nq; ++iv) {
                memcpy(q_blk + iv*d, (const char *) q->data + (h0 + iv/rb)*q->nb[1] + (r0 + iv%rb)*q->nb[2], d*sizeof(float));
            }

            for (int64_t j0 = 0; j0 < n_kv; j0 += nt) {
                const int64_t ntj = MIN(nt, n_kv - j0);

                // a tile that every row of the block masks out needs no products
                bool any = mask == nullptr;
                for (int64_t ir = 0; ir < rb && !any; ++ir) {
                    const float * mr = (const float *) ((const char *) mask->data + (r0 + ir)*nbm1) + j0;
                    for (int64_t t = 0; t < ntj; ++t) {
                        if (mr[t] != -INFINITY) {
                            any = true;
                            break;
                        }
                    }
                }
                if (!any) {
                    for (int64_t iv = 0; iv < nq; ++iv) {
                        for (int64_t t = 0; t < ntj; ++t) {
                            logits[iv*n_kv + j0 + t] = -INFINITY;
                        }
                    }
                    continue;
                }

                // the tile's K rows in F32, transposed (k_tile[i*nt + t]), zero-padded past the last cell
                for (int64_t t = 0; t < nt; ++t) {
                    if (t < ntj) {
                        const char * k_row = (const char *) k->data + (j0 + t)*k->nb[1] + hkv*k->nb[2];
                        switch (k->type) {
                            case GGML_TYPE_F32:  memcpy(k_f32, k_row, d*sizeof(float)); break;
                            case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) k_row, k_f32, d); break; // SIMD
                            case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) k_row, k_f32, d); break;
                            default:             k_to_float(k_row, k_f32, d); break;
                        }
                        for (int64_t i = 0; i < d; ++i) {
                            k_tile[i*nt + t] = k_f32[i];
                        }
                    } else {
                        for (int64_t i = 0; i < d; ++i) {
                            k_tile[i*nt + t] = 0.0f;
                        }
                    }
                }

                memset(kq, 0, nq*nt*sizeof(float));
                simd_gemm(kq, q_blk, k_tile, (int) nq, (int) d, (int) nt);

                for (int64_t iv = 0; iv < nq; ++iv) {
                    const int64_t r  = r0 + iv%rb;
                    const float * mr = mask ? (const float *) ((const char *) mask->data + r*nbm1) + j0 : nullptr;
                    for (int64_t t = 0; t < ntj; ++t) {
                        const float m = mr ? mr[t] : 0.0f;
                        // a masked cell stays -inf whatever its K row holds (an empty cell's row may be stale)
                        const float x = kq[iv*nt + t]*scale;
                        logits[iv*n_kv + j0 + t] = m == -INFINITY ? -INFINITY : (softcap > 0.0f ? softcap*tanhf(x) : x) + m;
                    }
                }
            }

            for (int64_t iv = 0; iv < nq; ++iv) {
                const int64_t r = r0 + iv%rb;
                const float w = row_w ? ((const float *) row_w->data)[r] : 1.0f;
                float * lr  = logits + iv*n_kv;
                float * acc = acc_all + (h0 + iv/rb)*n_kv;

                float max = -INFINITY;
                ggml_vec_max_f32(n_kv, &max, lr);

                if (max == -INFINITY || w == 0.0f) {
                    // a fully masked row (or a row of weight 0) contributes 0 to every cell
                    if (red_row == GGML_KV_SCORES_REDUCE_MAX) {
                        for (int64_t j = 0; j < n_kv; ++j) {
                            acc[j] = MAX(acc[j], 0.0f);
                        }
                    }
                    continue;
                }

                const ggml_float sum = ggml_vec_soft_max_f32(n_kv, lr, lr, max);
                const float coef = (float) (w/sum);
                for (int64_t j = 0; j < n_kv; ++j) {
                    acc[j] = ggml_kv_scores_reduce(acc[j], lr[j]*coef, red_row);
                }
            }
        }
    }

    ggml_barrier(params->threadpool);

    // 2. reduce over the query heads of each KV head
    const int64_t n_out = n_hkv*n_kv;
    const int64_t de  = (n_out + nth - 1)/nth;
    const int64_t ie0 = MIN(de*ith, n_out);
    const int64_t ie1 = MIN(ie0 + de, n_out);

    for (int64_t e = ie0; e < ie1; ++e) {
        const int64_t hkv = e/n_kv;
        const int64_t j   = e%n_kv;
        float v = acc_all[(hkv*n_grp)*n_kv + j];
        for (int64_t g = 1; g < n_grp; ++g) {
            v = ggml_kv_scores_reduce(v, acc_all[(hkv*n_grp + g)*n_kv + j], red_grp);
        }
        ((float *) dst->data)[e] = v;
    }
}
