// GGML_OP_KV_SCORES against the graph it replaces in llama_kv_cache::budget_evict:
// mul_mat + soft_max_ext (+ mul by the row weights) + reductions over the rows and the query heads.
//
//   test-kv-scores          check every backend (the CPU op against the composed CPU graph, other
//                           backends' op against the CPU op and their composed graph)
//   test-kv-scores perf     also time the op and the composed graph at eviction shapes on every backend
//
// A query row whose cells are all masked makes soft_max produce NaN; the op counts it as 0. The composed
// reference therefore runs without that row (dropping a row = adding 0, for sum and for max of p >= 0).

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

struct kv_case {
    ggml_type type_k;
    int64_t   d;
    int64_t   n_head;
    int64_t   n_head_kv;
    int64_t   n_rows;
    int64_t   n_kv;
    bool      row_w;
    ggml_kv_scores_reduce red_row;
    ggml_kv_scores_reduce red_grp;
    float     scale_mul;
    float     softcap = 0.0f; // attention logit soft-capping (0: none)

    std::string str() const {
        char buf[256];
        snprintf(buf, sizeof(buf), "type_k=%s d=%lld heads=%lld/%lld rows=%lld n_kv=%lld row_w=%d red=%s/%s scale=%.0f/sqrt(d) softcap=%.0f",
                ggml_type_name(type_k), (long long) d, (long long) n_head, (long long) n_head_kv, (long long) n_rows,
                (long long) n_kv, row_w ? 1 : 0, red_row == GGML_KV_SCORES_REDUCE_SUM ? "sum" : "max",
                red_grp == GGML_KV_SCORES_REDUCE_SUM ? "sum" : "max", scale_mul, softcap);
        return buf;
    }
};

// host data of one case
struct kv_data {
    int64_t n_cells;             // cells of the K cache (more than n_kv: the op reads a view)
    std::vector<float>   q;      // [n_rows][n_head][d]
    std::vector<uint8_t> k_raw;  // [n_cells][n_head_kv*d] of type_k
    std::vector<float>   k_f32;  // k_raw converted to F32
    std::vector<float>   mask;   // [n_rows][n_kv]
    std::vector<float>   w;      // [n_rows]
    int64_t r_full = -1;         // the fully masked row
};

kv_data make_data(const kv_case & c, uint32_t seed) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> dis(-1.0f, 1.0f);
    std::uniform_real_distribution<float> uni(0.0f, 1.0f);

    kv_data r;
    r.n_cells = c.n_kv + 5;

    r.q.resize(c.n_rows*c.n_head*c.d);
    for (auto & v : r.q) {
        v = dis(gen);
    }

    const int64_t n_embd_k = c.n_head_kv*c.d;
    std::vector<float> k(r.n_cells*n_embd_k);
    for (auto & v : k) {
        v = dis(gen);
    }
    r.k_raw.resize(ggml_row_size(c.type_k, n_embd_k)*r.n_cells);
    r.k_f32.resize(k.size());
    if (c.type_k == GGML_TYPE_F32) {
        memcpy(r.k_raw.data(), k.data(), k.size()*sizeof(float));
        r.k_f32 = k;
    } else {
        ggml_quantize_chunk(c.type_k, k.data(), r.k_raw.data(), 0, r.n_cells, n_embd_k, nullptr);
        ggml_get_type_traits(c.type_k)->to_float(r.k_raw.data(), r.k_f32.data(), (int64_t) k.size());
    }

    // masked: the recent window at the end, a sink at the start, scattered cells; one row fully masked. With 32
    // rows also a protected block of 60 % at the start, as kv_recent lays the cells out (whole tiles masked)
    r.mask.assign(c.n_rows*c.n_kv, 0.0f);
    const int64_t n_head_masked = c.n_rows == 32 ? 6*c.n_kv/10 : 2;
    for (int64_t i = 0; i < c.n_rows; ++i) {
        for (int64_t j = 0; j < c.n_kv; ++j) {
            if (j >= c.n_kv - c.n_kv/10 || j < n_head_masked || uni(gen) < 0.3f) {
                r.mask[i*c.n_kv + j] = -INFINITY;
            }
        }
    }
    if (c.n_rows > 1) {
        r.r_full = c.n_rows/3;
        std::fill(r.mask.begin() + r.r_full*c.n_kv, r.mask.begin() + (r.r_full + 1)*c.n_kv, -INFINITY);
    }

    // H2O: 1 for the queries since the last eviction, 0 for the others
    r.w.resize(c.n_rows);
    for (int64_t i = 0; i < c.n_rows; ++i) {
        r.w[i] = i % 4 == 1 ? 0.0f : 1.0f;
    }

    return r;
}

// reduce dim 0 of t with sum or max (kv_budget_reduce_rows of llama-kv-budget.cpp)
ggml_tensor * reduce_rows(ggml_context * ctx, ggml_tensor * t, ggml_kv_scores_reduce op) {
    if (op == GGML_KV_SCORES_REDUCE_SUM) {
        return ggml_sum_rows(ctx, t);
    }
    const int64_t n = t->ne[0];
    ggml_tensor * t2 = ggml_reshape_2d(ctx, t, n, ggml_nelements(t)/n);
    ggml_tensor * r  = ggml_pool_1d(ctx, t2, GGML_OP_POOL_MAX, (int) n, (int) n, 0);
    return ggml_reshape_4d(ctx, r, 1, t->ne[1], t->ne[2], t->ne[3]);
}

// the composed scoring graph of budget_evict
ggml_tensor * build_composed(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * mask, ggml_tensor * w,
        float scale, float softcap, ggml_kv_scores_reduce red_row, ggml_kv_scores_reduce red_grp) {
    const int64_t n_kv   = k->ne[1];
    const int64_t n_hkv  = k->ne[2];
    const int64_t n_rows = q->ne[2];
    const int64_t n_grp  = q->ne[1]/n_hkv;

    ggml_tensor * qp = ggml_permute(ctx, q, 0, 2, 1, 3);              // [d, n_rows, n_head]
    ggml_tensor * kq = ggml_mul_mat(ctx, k, qp);                       // [n_kv, n_rows, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    if (softcap > 0.0f) {
        kq = ggml_tanh(ctx, ggml_scale(ctx, kq, scale/softcap)); // build_attn_mha's soft-capping
        scale = softcap;
    }
    kq = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
    if (w) {
        kq = ggml_mul(ctx, kq, w);
    }
    ggml_tensor * a = ggml_reshape_4d(ctx, kq, n_kv, n_rows, n_grp, n_hkv);
    a = ggml_cont(ctx, ggml_transpose(ctx, a));                        // [n_rows, n_kv, n_grp, n_hkv]
    a = reduce_rows(ctx, a, red_row);                                  // [1, n_kv, n_grp, n_hkv]
    if (n_grp > 1) {
        a = ggml_reshape_3d(ctx, a, n_kv, n_grp, n_hkv);
        a = ggml_cont(ctx, ggml_transpose(ctx, a));                    // [n_grp, n_kv, n_hkv]
        a = reduce_rows(ctx, a, red_grp);                              // [1, n_kv, n_hkv]
    }
    return ggml_reshape_2d(ctx, a, n_kv, n_hkv);
}

enum graph_kind {
    GRAPH_FUSED,
    GRAPH_COMPOSED,
};

struct run_result {
    std::vector<float> out;  // [n_head_kv][n_kv]
    double t_us = 0.0;       // per run (perf)
    bool   supported = true;
};

// compute the scores on a backend; drop_full: leave the fully masked row out; k_type: native or F32
run_result run(ggml_backend_t backend, const kv_case & c, const kv_data & data, graph_kind kind, ggml_type k_type,
        bool drop_full, int n_perf) {
    run_result res;

    std::vector<int64_t> rows;
    for (int64_t i = 0; i < c.n_rows; ++i) {
        if (!(drop_full && i == data.r_full)) {
            rows.push_back(i);
        }
    }
    const int64_t n_rows = rows.size();

    ggml_init_params ip = {
        /*.mem_size   =*/ 64*ggml_tensor_overhead() + ggml_graph_overhead(),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * ctx = ggml_init(ip);

    const int64_t n_embd_k = c.n_head_kv*c.d;
    ggml_tensor * q       = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, c.d, c.n_head, n_rows);
    ggml_tensor * k_cache = ggml_new_tensor_2d(ctx, k_type, n_embd_k, data.n_cells);
    ggml_tensor * mask    = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, c.n_kv, n_rows);
    ggml_tensor * w       = c.row_w ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_rows) : nullptr;

    ggml_tensor * k = ggml_view_3d(ctx, k_cache, c.d, c.n_kv, c.n_head_kv, k_cache->nb[1], ggml_row_size(k_type, c.d), 0);

    const float scale = c.scale_mul/sqrtf((float) c.d);
    ggml_tensor * out = kind == GRAPH_FUSED
        ? ggml_kv_scores(ctx, q, k, mask, w, scale, c.softcap, c.red_row, c.red_grp)
        : build_composed(ctx, q, k, mask, w, scale, c.softcap, c.red_row, c.red_grp);

    if (kind == GRAPH_FUSED && !ggml_backend_supports_op(backend, out)) {
        res.supported = false;
        ggml_free(ctx);
        return res;
    }

    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, out);

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    GGML_ASSERT(buf);

    {
        std::vector<float> qs(n_rows*c.n_head*c.d);
        std::vector<float> ms(n_rows*c.n_kv);
        std::vector<float> ws(n_rows);
        for (int64_t i = 0; i < n_rows; ++i) {
            const int64_t r = rows[i];
            std::copy_n(data.q.begin()    + r*c.n_head*c.d, c.n_head*c.d, qs.begin() + i*c.n_head*c.d);
            std::copy_n(data.mask.begin() + r*c.n_kv,       c.n_kv,       ms.begin() + i*c.n_kv);
            ws[i] = data.w[r];
        }
        ggml_backend_tensor_set(q,    qs.data(), 0, ggml_nbytes(q));
        ggml_backend_tensor_set(mask, ms.data(), 0, ggml_nbytes(mask));
        if (w) {
            ggml_backend_tensor_set(w, ws.data(), 0, ggml_nbytes(w));
        }
        if (k_type == c.type_k) {
            ggml_backend_tensor_set(k_cache, data.k_raw.data(), 0, ggml_nbytes(k_cache));
        } else {
            GGML_ASSERT(k_type == GGML_TYPE_F32);
            ggml_backend_tensor_set(k_cache, data.k_f32.data(), 0, ggml_nbytes(k_cache));
        }
    }

    GGML_ASSERT(ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS);

    if (n_perf > 0) {
        ggml_backend_synchronize(backend);
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < n_perf; ++i) {
            ggml_backend_graph_compute_async(backend, gf);
        }
        ggml_backend_synchronize(backend);
        const auto t1 = std::chrono::steady_clock::now();
        res.t_us = std::chrono::duration<double, std::micro>(t1 - t0).count()/n_perf;
    }

    res.out.resize(ggml_nelements(out));
    ggml_backend_tensor_get(out, res.out.data(), 0, ggml_nbytes(out));

    ggml_backend_buffer_free(buf);
    ggml_free(ctx);

    return res;
}

struct cmp_result {
    double nmse    = 0.0;
    double max_rel = 0.0; // max |a - b| / max |b|
    bool   finite  = true;
};

cmp_result compare(const std::vector<float> & a, const std::vector<float> & b) {
    GGML_ASSERT(a.size() == b.size());
    cmp_result r;
    double err = 0.0;
    double ref = 0.0;
    double amax = 0.0;
    double bmax = 0.0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i]) || !std::isfinite(b[i])) {
            r.finite = false;
            continue;
        }
        const double e = (double) a[i] - b[i];
        err += e*e;
        ref += (double) b[i]*b[i];
        amax = std::max(amax, std::fabs(e));
        bmax = std::max(bmax, (double) std::fabs(b[i]));
    }
    r.nmse    = ref > 0.0 ? err/ref : err;
    r.max_rel = bmax > 0.0 ? amax/bmax : amax;
    return r;
}

std::vector<kv_case> make_cases() {
    std::vector<kv_case> cases;
    const ggml_kv_scores_reduce SUM = GGML_KV_SCORES_REDUCE_SUM;
    const ggml_kv_scores_reduce MAX = GGML_KV_SCORES_REDUCE_MAX;
    const int64_t n_kvs[] = { 300, 1000, 2049, 4095 };
    int i = 0;
    for (int64_t d : { 64, 128 }) {
        for (auto [n_head, n_head_kv] : { std::pair<int64_t, int64_t>{32, 8}, std::pair<int64_t, int64_t>{9, 3} }) {
            for (ggml_type type_k : { GGML_TYPE_F16, GGML_TYPE_Q8_0, GGML_TYPE_F32 }) {
                for (auto [red_row, red_grp] : { std::pair{SUM, SUM}, std::pair{MAX, MAX}, std::pair{MAX, SUM}, std::pair{SUM, MAX} }) {
                    for (bool row_w : { false, true }) {
                        const int64_t n_rows = i % 2 == 0 ? 32 : 64;
                        const int64_t n_kv   = n_kvs[(i/2) % 4];
                        const float   smul   = i % 3 == 0 ? 8.0f : 1.0f; // peaked and flat attention
                        cases.push_back({ type_k, d, n_head, n_head_kv, n_rows, n_kv, row_w, red_row, red_grp, smul });
                        ++i;
                    }
                }
            }
        }
    }
    cases.push_back({ GGML_TYPE_BF16, 128, 32, 8, 32, 777, false, SUM, SUM, 1.0f });
    cases.push_back({ GGML_TYPE_F16,  128, 32, 8,  1,  65, false, MAX, MAX, 1.0f });
    cases.push_back({ GGML_TYPE_F16,   96, 12, 4, 32, 500, true,  SUM, SUM, 1.0f });
    cases.push_back({ GGML_TYPE_F16,   80, 12, 4, 32, 500, true,  SUM, SUM, 1.0f }); // not on CUDA
    // Gemma: head size 256, one KV head; Gemma 2's soft-capping (50) at scales that reach it, and a tight one
    cases.push_back({ GGML_TYPE_F16,  256,  4, 1, 32, 1000, false, SUM, SUM, 1.0f });
    cases.push_back({ GGML_TYPE_Q8_0, 256,  8, 4, 64, 2049, true,  MAX, SUM, 8.0f });
    cases.push_back({ GGML_TYPE_F16,  256,  8, 4, 32, 1000, false, SUM, SUM, 64.0f, 50.0f });
    cases.push_back({ GGML_TYPE_F16,  128, 32, 8, 32, 777,  true,  MAX, MAX, 64.0f, 5.0f });
    cases.push_back({ GGML_TYPE_Q8_0, 128,  9, 3, 64, 300,  false, SUM, MAX, 8.0f, 50.0f });
    // more than 32 query heads per KV head: the CUDA kernel recomputes the logits in its second pass
    cases.push_back({ GGML_TYPE_F16,  128, 64, 1, 16, 300, true,  SUM, SUM, 1.0f });
    cases.push_back({ GGML_TYPE_Q8_0,  64, 48, 1,  8, 129, false, MAX, SUM, 1.0f });
    return cases;
}

} // namespace

int main(int argc, char ** argv) {
    const bool perf = argc > 1 && strcmp(argv[1], "perf") == 0;

    ggml_backend_load_all();

    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    GGML_ASSERT(cpu);
    ggml_backend_cpu_set_n_threads(cpu, std::max(1u, std::thread::hardware_concurrency()));

    std::vector<ggml_backend_t> others;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
            continue;
        }
        ggml_backend_t b = ggml_backend_dev_init(dev, nullptr);
        if (b) {
            others.push_back(b);
        }
    }

    // thresholds: the op converts K to F32 and computes in F32; the composed graph with F32 K does the same
    // up to summation order. With native K types the CPU mul_mat rounds q to K's dot type (F16, Q8_0, BF16)
    const double tol_exact  = 1e-9;
    const double tol_native = 1e-3;
    const double tol_device = 1e-6;

    int n_fail = 0;
    int n_ok   = 0;

    const auto cases = make_cases();
    for (size_t ic = 0; ic < cases.size(); ++ic) {
        const kv_case & c = cases[ic];
        const kv_data data = make_data(c, 42 + ic);

        const run_result fused    = run(cpu, c, data, GRAPH_FUSED,    c.type_k,       false, 0);
        const run_result exact    = run(cpu, c, data, GRAPH_COMPOSED, GGML_TYPE_F32,  true,  0);
        const run_result native   = run(cpu, c, data, GRAPH_COMPOSED, c.type_k,       true,  0);
        const run_result fused_nf = run(cpu, c, data, GRAPH_FUSED,    c.type_k,       true,  0);

        const cmp_result e  = compare(fused.out, exact.out);
        const cmp_result n  = compare(fused.out, native.out);
        const cmp_result nf = compare(fused.out, fused_nf.out); // the fully masked row adds exactly 0

        bool ok = fused.supported && e.finite && e.nmse < tol_exact && n.nmse < tol_native && nf.nmse == 0.0;

        printf("%-3s CPU      %s: nmse vs composed F32-K %.2e (max rel %.1e), vs composed native-K %.2e, masked row %s\n",
                ok ? "ok" : "BAD", c.str().c_str(), e.nmse, e.max_rel, n.nmse, nf.nmse == 0.0 ? "adds 0" : "CHANGES");

        for (ggml_backend_t b : others) {
            const run_result dev_fused = run(b, c, data, GRAPH_FUSED, c.type_k, false, 0);
            if (!dev_fused.supported) {
                printf("--  %-8s %s: op not supported (composed graph)\n", ggml_backend_name(b), c.str().c_str());
                continue;
            }
            const run_result dev_comp = run(b, c, data, GRAPH_COMPOSED, c.type_k, true, 0);
            const cmp_result de = compare(dev_fused.out, fused.out);
            const cmp_result dc = compare(dev_comp.out,  fused.out);
            const bool dok = de.finite && de.nmse < tol_device;
            printf("%-3s %-8s %s: nmse vs CPU op %.2e (max rel %.1e), its composed graph vs CPU op %.2e\n",
                    dok ? "ok" : "BAD", ggml_backend_name(b), c.str().c_str(), de.nmse, de.max_rel, dc.nmse);
            ok = ok && dok;
        }

        ok ? ++n_ok : ++n_fail;
    }

    if (perf) {
        printf("\nperf: eviction scoring of one layer, us per run (fused op / composed graph)\n");
        for (ggml_type type_k : { GGML_TYPE_F16, GGML_TYPE_Q8_0 }) {
            for (int64_t d : { 128, 64 }) {
                for (int64_t n_kv : { 1024, 4096, 16384 }) {
                    for (int64_t n_rows : { 32, 64 }) {
                        const kv_case c = { type_k, d, 32, 8, n_rows, n_kv, false, GGML_KV_SCORES_REDUCE_SUM, GGML_KV_SCORES_REDUCE_SUM, 1.0f };
                        const kv_data data = make_data(c, 7);
                        std::vector<ggml_backend_t> bs = others;
                        if (n_kv <= 4096) {
                            bs.push_back(cpu);
                        }
                        for (ggml_backend_t b : bs) {
                            const int n_perf = b == cpu ? 3 : 50;
                            const run_result f = run(b, c, data, GRAPH_FUSED,    type_k, false, n_perf);
                            const run_result m = run(b, c, data, GRAPH_COMPOSED, type_k, true,  n_perf);
                            printf("  %-8s %s: %10.1f / %10.1f us\n", ggml_backend_name(b), c.str().c_str(),
                                    f.supported ? f.t_us : NAN, m.t_us);
                        }
                    }
                }
            }
        }
    }

    for (ggml_backend_t b : others) {
        ggml_backend_free(b);
    }
    ggml_backend_free(cpu);

    printf("\n%d/%d cases passed\n", n_ok, n_ok + n_fail);
    return n_fail == 0 ? 0 : 1;
}
