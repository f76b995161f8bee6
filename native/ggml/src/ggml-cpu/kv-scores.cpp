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
// A tile that every row of a block masks out is skipped altogether (no products, no softmax, no sums): its
// probabilities are 0. An eviction masks its protected cells, which it keeps together: most tiles of a
// decode-time eviction are skipped. A thread keeps the converted tiles of its current KV head (up to
// GGML_KV_SCORES_CPU_KEEP floats): the query heads of a group, taken one by one, convert K once.
static constexpr int64_t GGML_KV_SCORES_CPU_ROWS  = 16;      // rows per block at least (or all of them)
static constexpr int64_t GGML_KV_SCORES_CPU_TILE  = 64;      // cells per K tile
static constexpr int64_t GGML_KV_SCORES_CPU_BLOCK = 1 << 19; // logits per thread (2 MiB) blocks grow to
static constexpr int64_t GGML_KV_SCORES_CPU_KEEP  = 1 << 20; // floats of converted K tiles a thread keeps (4 MiB)

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

static int64_t ggml_kv_scores_cpu_n_tiles(int64_t n_kv) {
    return (n_kv + GGML_KV_SCORES_CPU_TILE - 1)/GGML_KV_SCORES_CPU_TILE;
}

// converted K tiles a thread keeps: every tile of a KV head, or one where they do not fit
static int64_t ggml_kv_scores_cpu_k_tiles(int64_t d, int64_t n_kv) {
    const int64_t n_tiles = ggml_kv_scores_cpu_n_tiles(n_kv);
    return d*GGML_KV_SCORES_CPU_TILE*n_tiles <= GGML_KV_SCORES_CPU_KEEP ? n_tiles : 1;
}

// a thread's share of the work buffer, in floats: the logits of a block, one converted K row, the transposed
// K tiles and which tile of which KV head each holds, the block's query vectors, their products with a tile and row maxima,
// which tiles each block of rows sees
static int64_t ggml_kv_scores_cpu_thread_floats(int64_t d, int64_t n_rows, int64_t n_kv, const ggml_kv_scores_cpu_blocks & b) {
    const int64_t nq  = b.n_heads*b.n_rows;
    const int64_t nt  = GGML_KV_SCORES_CPU_TILE;
    const int64_t nkt = ggml_kv_scores_cpu_k_tiles(d, n_kv);
    const int64_t nrb = (n_rows + b.n_rows - 1)/b.n_rows;
    return nq*n_kv + d + (d*nt + 1)*nkt + nq*d + nq*nt + nq + nrb*ggml_kv_scores_cpu_n_tiles(n_kv) + CACHE_LINE_SIZE_F32;
}

// active[rb*n_tiles + t]: some row of row block rb sees a cell of tile t (the mask is the same for every head)
static void ggml_kv_scores_cpu_active_tiles(const ggml_tensor * mask, size_t nbm1, int64_t n_rows, int64_t rb_max,
        int64_t n_kv, float * active) {
    const int64_t nt      = GGML_KV_SCORES_CPU_TILE;
    const int64_t n_tiles = ggml_kv_scores_cpu_n_tiles(n_kv);
    for (int64_t r0 = 0, ib = 0; r0 < n_rows; r0 += rb_max, ++ib) {
        const int64_t rb = MIN(rb_max, n_rows - r0);
        for (int64_t it = 0; it < n_tiles; ++it) {
            const int64_t j0  = it*nt;
            const int64_t ntj = MIN(nt, n_kv - j0);
            bool any = mask == nullptr;
            for (int64_t ir = 0; ir < rb && !any; ++ir) {
                const float * mr = (const float *) ((const char *) mask->data + (r0 + ir)*nbm1) + j0;
                int n_seen = 0;
                for (int64_t t = 0; t < ntj; ++t) {
                    n_seen += mr[t] != -INFINITY;
                }
                any = n_seen > 0;
            }
            active[ib*n_tiles + it] = any ? 1.0f : 0.0f;
        }
    }
}

size_t ggml_cpu_kv_scores_work_size(const ggml_tensor * dst, int n_tasks) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];

    const int64_t d      = q->ne[0];
    const int64_t n_head = q->ne[1];
    const int64_t n_rows = q->ne[2];
    const int64_t n_kv   = k->ne[1];

    const ggml_kv_scores_cpu_blocks b = ggml_kv_scores_cpu_blocking(n_head, k->ne[2], n_rows, n_kv, n_tasks);

    // per query head: its rows reduced; per thread: its scratch
    return sizeof(float)*(n_head*n_kv + n_tasks*ggml_kv_scores_cpu_thread_floats(d, n_rows, n_kv, b));
}

static inline float ggml_kv_scores_reduce(float a, float b, int32_t op) {
    return op == GGML_KV_SCORES_REDUCE_MAX ? MAX(a, b) : a + b;
}

struct ggml_kv_scores_cpu_ctx {
    const ggml_tensor * q;
    const ggml_tensor * k;
    const ggml_tensor * mask;
    const ggml_tensor * row_w;
    size_t  nbm1;     // bytes between mask rows (0: one row for all)
    float   scale;    // scale/softcap with soft-capping
    float   softcap;  // 0: none
    int32_t red_row;
    int64_t d;
    int64_t n_kv;
    ggml_to_float_t k_to_float;
};

// the K rows of cells [j0, j0 + ntj) of KV head hkv in F32, transposed (k_tile[i*nt + t]), zero-padded past the
// last cell; k_f32: one row of scratch
static void ggml_kv_scores_cpu_k_tile(const ggml_kv_scores_cpu_ctx & c, int64_t hkv, int64_t j0, int64_t ntj,
        float * k_f32, float * k_tile) {
    const int64_t d  = c.d;
    const int64_t nt = GGML_KV_SCORES_CPU_TILE;
    const ggml_tensor * k = c.k;

    for (int64_t t = 0; t < nt; ++t) {
        if (t < ntj) {
            const char * k_row = (const char *) k->data + (j0 + t)*k->nb[1] + hkv*k->nb[2];
            switch (k->type) {
                case GGML_TYPE_F32:  memcpy(k_f32, k_row, d*sizeof(float)); break;
                case GGML_TYPE_F16:  ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) k_row, k_f32, d); break; // SIMD
                case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) k_row, k_f32, d); break;
                default:             c.k_to_float(k_row, k_f32, d); break;
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
}

// the logits of the block's nq query vectors (q_blk, rows r0 + iv%rb) against the cells [j0, j0 + ntj) of the
// converted tile k_tile, into logits[iv*n_kv + j0 + t]; their maxima into row_max[iv]; kq: scratch
static void ggml_kv_scores_cpu_tile(const ggml_kv_scores_cpu_ctx & c, int64_t j0, int64_t ntj, int64_t r0, int64_t rb,
        int64_t nq, const float * q_blk, const float * k_tile, float * kq, float * logits, float * row_max) {
    const int64_t nt = GGML_KV_SCORES_CPU_TILE;

    memset(kq, 0, nq*nt*sizeof(float));
    simd_gemm(kq, q_blk, k_tile, (int) nq, (int) c.d, (int) nt);

    for (int64_t iv = 0; iv < nq; ++iv) {
        const float * mr = c.mask ? (const float *) ((const char *) c.mask->data + (r0 + iv%rb)*c.nbm1) + j0 : nullptr;
        const float * kr = kq + iv*nt;
        float       * lr = logits + iv*c.n_kv + j0;
        if (c.softcap > 0.0f) {
            for (int64_t t = 0; t < ntj; ++t) {
                lr[t] = c.softcap*tanhf(kr[t]*c.scale);
            }
        } else {
            for (int64_t t = 0; t < ntj; ++t) {
                lr[t] = kr[t]*c.scale;
            }
        }
        if (mr) {
            // a masked cell stays -inf whatever its K row holds (an empty cell's row may be stale)
            for (int64_t t = 0; t < ntj; ++t) {
                lr[t] = mr[t] == -INFINITY ? -INFINITY : lr[t] + mr[t];
            }
        }
        // eight running maxima: no serial dependency over the cells
        float mx[8] = { -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY };
        int64_t t = 0;
        for (; t + 8 <= ntj; t += 8) {
            for (int u = 0; u < 8; ++u) {
                mx[u] = mx[u] > lr[t + u] ? mx[u] : lr[t + u];
            }
        }
        for (; t < ntj; ++t) {
            mx[0] = MAX(mx[0], lr[t]);
        }
        for (int u = 0; u < 8; ++u) {
            row_max[iv] = MAX(row_max[iv], mx[u]);
        }
    }
}

// row r's logits lr (valid in the active tiles, their maximum max) -> its probabilities, weighted, reduced into acc
static void ggml_kv_scores_cpu_row(const ggml_kv_scores_cpu_ctx & c, int64_t r, const float * active, float max,
        float * lr, float * acc) {
    const int64_t nt      = GGML_KV_SCORES_CPU_TILE;
    const int64_t n_kv    = c.n_kv;
    const int64_t n_tiles = ggml_kv_scores_cpu_n_tiles(n_kv);
    const float   w       = c.row_w ? ((const float *) c.row_w->data)[r] : 1.0f;

    if (max == -INFINITY || w == 0.0f) {
        // a fully masked row (or a row of weight 0) contributes 0 to every cell
        if (c.red_row == GGML_KV_SCORES_REDUCE_MAX) {
            for (int64_t j = 0; j < n_kv; ++j) {
                acc[j] = MAX(acc[j], 0.0f);
            }
        }
        return;
    }

    ggml_float sum = 0.0;
    for (int64_t it = 0; it < n_tiles; ++it) {
        if (active[it] != 0.0f) {
            sum += ggml_vec_soft_max_f32((int) MIN(nt, n_kv - it*nt), lr + it*nt, lr + it*nt, max);
        }
    }
    const float coef = (float) (w/sum);
    for (int64_t it = 0; it < n_tiles; ++it) {
        if (active[it] == 0.0f) {
            continue;
        }
        for (int64_t j = it*nt; j < MIN((it + 1)*nt, n_kv); ++j) {
            acc[j] = ggml_kv_scores_reduce(acc[j], lr[j]*coef, c.red_row);
        }
    }
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

    ggml_kv_scores_cpu_ctx c;
    c.q       = q;
    c.k       = k;
    c.mask    = mask;
    c.row_w   = row_w;
    c.nbm1    = mask && mask->ne[1] > 1 ? mask->nb[1] : 0;
    c.softcap = ggml_get_op_params_f32(dst, 3);
    c.scale   = c.softcap > 0.0f ? ggml_get_op_params_f32(dst, 0)/c.softcap : ggml_get_op_params_f32(dst, 0);
    c.red_row = ggml_get_op_params_i32(dst, 1);
    c.d       = q->ne[0];
    c.n_kv    = k->ne[1];
    c.k_to_float = ggml_get_type_traits(k->type)->to_float;
    GGML_ASSERT((k->type == GGML_TYPE_F32 || c.k_to_float) && "kv_scores: unsupported K type");

    const int32_t red_grp = ggml_get_op_params_i32(dst, 2);

    const int64_t d       = c.d;
    const int64_t n_head  = q->ne[1];
    const int64_t n_rows  = q->ne[2];
    const int64_t n_kv    = c.n_kv;
    const int64_t n_hkv   = k->ne[2];
    const int64_t n_grp   = n_head/n_hkv;
    const int64_t n_tiles = ggml_kv_scores_cpu_n_tiles(n_kv);

    const int ith = params->ith;
    const int nth = params->nth;

    const ggml_kv_scores_cpu_blocks b = ggml_kv_scores_cpu_blocking(n_head, n_hkv, n_rows, n_kv, nth);
    const int64_t nh     = b.n_heads;
    const int64_t rb_max = b.n_rows;
    const int64_t nq_max = nh*rb_max;
    const int64_t nt     = GGML_KV_SCORES_CPU_TILE;

    const int64_t nkt    = ggml_kv_scores_cpu_k_tiles(d, n_kv);

    float * acc_all = (float *) params->wdata;                       // [n_kv, n_head]
    float * logits  = acc_all + n_head*n_kv + ith*ggml_kv_scores_cpu_thread_floats(d, n_rows, n_kv, b);
    float * k_f32   = logits + nq_max*n_kv;  // [d]: one K row
    float * k_tiles = k_f32 + d;             // [d, nt] per kept tile: the K tiles, transposed
    float * q_blk   = k_tiles + d*nt*nkt;    // [nq, d]: the block's query vectors, (head, row) in order
    float * kq      = q_blk + nq_max*d;      // [nq, nt]: their products with a tile
    float * row_max = kq + nq_max*nt;        // [nq]: the maxima of their logits
    float * active  = row_max + nq_max;      // [n_tiles, row blocks]: the tiles each row block sees
    int32_t * k_tag = (int32_t *) (active + ((n_rows + rb_max - 1)/rb_max)*n_tiles); // [nkt]: hkv*n_tiles + tile held

    const float init_row = c.red_row == GGML_KV_SCORES_REDUCE_MAX ? -INFINITY : 0.0f;

    // 1. per query head: softmax of every row over the cells, weighted, reduced over the rows in order;
    //    the threads take consecutive sets of nh query heads (of one KV head each)
    const int64_t n_sets = n_head/nh;
    const int64_t ds  = (n_sets + nth - 1)/nth;
    const int64_t is0 = MIN(ds*ith, n_sets);
    const int64_t is1 = MIN(is0 + ds, n_sets);

    if (is0 < is1) {
        ggml_kv_scores_cpu_active_tiles(mask, c.nbm1, n_rows, rb_max, n_kv, active);
    }
    for (int64_t it = 0; it < nkt; ++it) {
        k_tag[it] = -1;
    }

    for (int64_t is = is0; is < is1; ++is) {
        const int64_t h0  = is*nh;
        const int64_t hkv = h0/n_grp;
        for (int64_t j = 0; j < nh*n_kv; ++j) {
            acc_all[h0*n_kv + j] = init_row;
        }

        for (int64_t r0 = 0, ib = 0; r0 < n_rows; r0 += rb_max, ++ib) {
            const int64_t rb = MIN(rb_max, n_rows - r0);
            const int64_t nq = nh*rb; // query vector iv = ih*rb + ir: head h0 + ih, row r0 + ir
            const float * act = active + ib*n_tiles;

            for (int64_t iv = 0; iv < nq; ++iv) {
                memcpy(q_blk + iv*d, (const char *) q->data + (h0 + iv/rb)*q->nb[1] + (r0 + iv%rb)*q->nb[2], d*sizeof(float));
            }
            for (int64_t iv = 0; iv < nq; ++iv) {
                row_max[iv] = -INFINITY;
            }
            for (int64_t it = 0; it < n_tiles; ++it) {
                if (act[it] == 0.0f) {
                    continue;
                }
                const int64_t ik  = nkt > 1 ? it : 0;
                const int64_t ntj = MIN(nt, n_kv - it*nt);
                const int32_t tag = (int32_t) (hkv*n_tiles + it);
                if (k_tag[ik] != tag) {
                    ggml_kv_scores_cpu_k_tile(c, hkv, it*nt, ntj, k_f32, k_tiles + ik*d*nt);
                    k_tag[ik] = tag;
                }
                ggml_kv_scores_cpu_tile(c, it*nt, ntj, r0, rb, nq, q_blk, k_tiles + ik*d*nt, kq, logits, row_max);
            }
            for (int64_t iv = 0; iv < nq; ++iv) {
                ggml_kv_scores_cpu_row(c, r0 + iv%rb, act, row_max[iv], logits + iv*n_kv, acc_all + (h0 + iv/rb)*n_kv);
            }
            if (c.red_row == GGML_KV_SCORES_REDUCE_MAX) {
                // every row's probabilities are 0 in a tile the block does not see: max(acc, 0) once for all rows
                for (int64_t ih = 0; ih < nh; ++ih) {
                    float * acc = acc_all + (h0 + ih)*n_kv;
                    for (int64_t it = 0; it < n_tiles; ++it) {
                        if (act[it] != 0.0f) {
                            continue;
                        }
                        for (int64_t j = it*nt; j < MIN((it + 1)*nt, n_kv); ++j) {
                            acc[j] = MAX(acc[j], 0.0f);
                        }
                    }
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
