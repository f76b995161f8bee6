#include "llama-kv-budget.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-context.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <thread>

//
// configuration
//

static const char * kv_fusion_name(int v) {
    switch (v) {
        case LLAMA_KV_FUSION_SUM: return "sum";
        case LLAMA_KV_FUSION_MAX: return "max";
    }
    return "?";
}

static const char * kv_granularity_name(int v) {
    switch (v) {
        case LLAMA_KV_GRANULARITY_HEAD:  return "head";
        case LLAMA_KV_GRANULARITY_TOKEN: return "token";
    }
    return "?";
}

static const char * kv_policy_name(int v) {
    switch (v) {
        case LLAMA_KV_POLICY_MORPHKV:   return "morphkv";
        case LLAMA_KV_POLICY_STREAMING: return "streaming";
        case LLAMA_KV_POLICY_H2O:       return "h2o";
        case LLAMA_KV_POLICY_SNAPKV:    return "snapkv";
    }
    return "?";
}

[[noreturn]] static void kv_budget_fail(const std::string & msg) {
    throw std::runtime_error("kv_budget: " + msg);
}

// kv_recent = 0: 3C/4 recent tokens protected (W of them score the rest), measured on the dev prompts of SmolLM2-135M
// and Gemma 3 270M against C/2 and 7C/8 (docs/evaluation.md); the sinks and one scored cell stay in the budget
static uint32_t kv_budget_auto_recent(uint32_t budget, uint32_t sinks) {
    const uint32_t r = (uint32_t) ((uint64_t) budget * 3 / 4);
    return budget > sinks + 1 ? std::min(r, budget - sinks - 1) : 0;
}

// kv_evict_interval = 0: budget/8 (one eviction per C/8 tokens: fewer for large budgets), at least 64 and at
// most n_ubatch, so that the cache (budget + max(interval, n_ubatch) cells) is no larger than with 64; H2O keeps
// 64, since its query ring holds every query since the last eviction
static uint32_t kv_budget_auto_interval(uint32_t budget, uint32_t n_ubatch, llama_kv_policy policy) {
    const uint32_t s_min = 64;
    if (policy == LLAMA_KV_POLICY_H2O) {
        return s_min;
    }
    return std::max(s_min, std::min(budget/8, n_ubatch));
}

void llama_kv_budget_configure(const llama_model & model, const llama_context_params & params, llama_cparams & cparams) {
    auto & kb = cparams.kv_budget;
    kb = llama_kv_budget_params();

    if (params.kv_budget == 0) {
        return; // stock behaviour
    }

    llama_kv_budget_check_model(model);

    if (params.kv_window == 0) {
        kv_budget_fail("kv_window must be at least 1 (the recent tokens whose queries score the cache)");
    }
    if (params.kv_budget <= params.kv_window + params.kv_sinks) {
        kv_budget_fail(format("kv_budget (%u) must be greater than kv_window (%u) + kv_sinks (%u): the budget includes "
                "the protected recent window and sinks", params.kv_budget, params.kv_window, params.kv_sinks));
    }
    if (params.kv_budget <= params.kv_recent + params.kv_sinks) {
        kv_budget_fail(format("kv_budget (%u) must be greater than kv_recent (%u) + kv_sinks (%u): the budget includes "
                "the protected recent tokens and sinks", params.kv_budget, params.kv_recent, params.kv_sinks));
    }
    for (const auto & [name, value] : { std::make_pair("kv_fusion", (int) params.kv_fusion),
                                        std::make_pair("kv_group_reduce", (int) params.kv_group_reduce) }) {
        if (value != LLAMA_KV_FUSION_SUM && value != LLAMA_KV_FUSION_MAX) {
            kv_budget_fail(format("unknown %s value %d (accepted: %d = sum, %d = max)", name, value,
                    LLAMA_KV_FUSION_SUM, LLAMA_KV_FUSION_MAX));
        }
    }
    if (params.kv_granularity != LLAMA_KV_GRANULARITY_HEAD && params.kv_granularity != LLAMA_KV_GRANULARITY_TOKEN) {
        kv_budget_fail(format("unknown kv_granularity value %d (accepted: %d = head, %d = token)", (int) params.kv_granularity,
                LLAMA_KV_GRANULARITY_HEAD, LLAMA_KV_GRANULARITY_TOKEN));
    }
    if (params.kv_policy < LLAMA_KV_POLICY_MORPHKV || params.kv_policy > LLAMA_KV_POLICY_SNAPKV) {
        kv_budget_fail(format("unknown kv_policy value %d (accepted: %d = morphkv, %d = streaming, %d = h2o, %d = snapkv)",
                (int) params.kv_policy, LLAMA_KV_POLICY_MORPHKV, LLAMA_KV_POLICY_STREAMING, LLAMA_KV_POLICY_H2O,
                LLAMA_KV_POLICY_SNAPKV));
    }
    // every sequence keeps its own budget in its own stream of the cache; a unified cache mixes the sequences'
    // cells in one stream, whose evictions would trade one sequence's tokens for another's
    if (params.n_seq_max > 1 && params.kv_unified) {
        kv_budget_fail(format("needs a cache per sequence: n_seq_max = %u with a unified KV cache (kv_unified) is not "
                "supported; turn kv_unified off (llama-server: --no-kv-unified) or use one sequence", params.n_seq_max));
    }
    if (params.n_seq_max > 1 && params.kv_policy == LLAMA_KV_POLICY_SNAPKV) {
        kv_budget_fail(format("kv_policy snapkv compresses the prompt of one sequence (n_seq_max = 1), got n_seq_max = %u",
                params.n_seq_max));
    }
    if (params.kv_keep > 0 && params.kv_policy == LLAMA_KV_POLICY_SNAPKV) {
        kv_budget_fail(format("kv_keep (%u) keeps the prompt, which kv_policy snapkv compresses; use kv_keep 0 with snapkv, "
                "or another policy (morphkv, streaming, h2o)", params.kv_keep));
    }
    if (params.kv_keep > cparams.n_ctx) {
        kv_budget_fail(format("kv_keep (%u) is larger than the context (n_ctx = %u): at most n_ctx prompt tokens can be kept",
                params.kv_keep, cparams.n_ctx));
    }
    if (params.flash_attn_type == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        kv_budget_fail("needs flash attention, which was explicitly disabled; enable it (or leave it on auto)");
    }
    // the types whose rows get_rows and set_rows move (the gather) and mul_mat scores (the composed graph)
    static const ggml_type kv_types[] = { GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_F32, GGML_TYPE_Q8_0, GGML_TYPE_Q4_0,
        GGML_TYPE_Q4_1, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1, GGML_TYPE_IQ4_NL };
    for (const auto & [name, type] : { std::make_pair("type_k", params.type_k), std::make_pair("type_v", params.type_v) }) {
        if (std::find(std::begin(kv_types), std::end(kv_types), type) == std::end(kv_types)) {
            kv_budget_fail(format("unsupported %s %s (accepted: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)",
                    name, ggml_type_name(type)));
        }
    }

    kb.budget       = params.kv_budget;
    kb.window       = params.kv_window;
    kb.interval     = params.kv_evict_interval ? params.kv_evict_interval :
                      kv_budget_auto_interval(params.kv_budget, cparams.n_ubatch, params.kv_policy);
    kb.sinks        = params.kv_sinks;
    kb.keep         = params.kv_keep;
    kb.recent       = params.kv_recent ? params.kv_recent : kv_budget_auto_recent(params.kv_budget, params.kv_sinks);
    kb.fusion       = params.kv_fusion;
    kb.group_reduce = params.kv_group_reduce;
    kb.granularity  = params.kv_granularity;
    kb.policy       = params.kv_policy;
    // after an eviction C cells (and up to K kept prompt cells) are in use; one more ubatch (prefill) or S tokens
    // (decode) must fit. SnapKV compresses once and then grows: it keeps the n_ctx allocation
    kb.n_cells      = kb.policy == LLAMA_KV_POLICY_SNAPKV ? 0 :
                      GGML_PAD(kb.budget + kb.keep + std::max(kb.interval, cparams.n_ubatch), 256);

    cparams.flash_attn = true; // composite cells need the non-transposed V of the flash-attention layout
    cparams.auto_fa    = false;

    if (params.swa_full && model.hparams.swa_type != LLAMA_SWA_TYPE_NONE) {
        LLAMA_LOG_INFO("%s: KV budget: the sliding-window layers keep a window-sized cache (swa_full does not apply: the "
                "budget bounds the memory of every layer)\n", __func__);
    }

    LLAMA_LOG_INFO("%s: KV budget: policy %s, %u cells kept (window %u, recent %u%s, sinks %u), prompt kept %u, eviction every %u "
            "tokens%s, fusion %s, group %s, granularity %s -> %u cells allocated per sequence (%u sequences)\n", __func__,
            kv_policy_name(kb.policy), kb.budget, kb.window, kb.n_recent(), params.kv_recent ? "" : " (auto)", kb.sinks, kb.keep, kb.interval,
            params.kv_evict_interval ? "" : " (auto)", kv_fusion_name(kb.fusion),
            kv_fusion_name(kb.group_reduce), kv_granularity_name(kb.granularity), kb.n_cells ? kb.n_cells : cparams.n_ctx,
            std::max(1u, params.n_seq_max));
}

const char * llama_kv_budget_accepted() {
    return "supported: decoders with a plain or sliding-window (iSWA) KV cache and rotary or no positions, such as "
           "llama, qwen2, mistral, gemma3; split mode layer or row";
}

void llama_kv_budget_check_model(const llama_model & model) {
    const auto & hparams = model.hparams;
    const std::string arch = model.arch_name();

    const char * why = nullptr;
    if (llm_arch_is_recurrent(model.arch)) {
        why = "recurrent state";
    } else if (llm_arch_is_hybrid(model.arch)) {
        why = "hybrid recurrent/attention memory";
    } else if (hparams.is_mla()) {
        why = "multi-head latent attention (MLA)";
    }
    if (why) {
        kv_budget_fail(format("not supported for architecture %s, whose memory is %s (%s)", arch.c_str(), why,
                llama_kv_budget_accepted()));
    }

    // plain KV caches whose attention needs what a composite cell cannot give: one position per cell and head
    // that masks and biases can read, or per-cell data that the eviction would have to move
    if (hparams.use_alibi) {
        why = "ALiBi attention biases (computed from one position per cell; a composite cell holds a different token "
              "per KV head)";
    } else if (hparams.n_pos_per_embd() > 1) {
        why = "multi-dimensional positions (M-RoPE: several positions per token, kept per cell)";
    } else if (hparams.ple_n_heads > 0) {
        why = "per-layer embeddings hashed from the tokens of each cell (kept per cell)";
    } else if (model.arch == LLM_ARCH_T5) {
        why = "a relative position bias added to the attention scores, which flash attention (needed by a budget) "
              "does not take";
    } else if (model.arch == LLM_ARCH_GROK) {
        why = "an attention that llama.cpp runs without flash attention (which a budget needs)";
    } else if (model.arch == LLM_ARCH_GEMMA4_ASSISTANT) {
        why = "the KV cache of another model (an assistant model)";
    } else if (model.split_mode() == LLAMA_SPLIT_MODE_TENSOR) {
        why = "a split across devices by tensor (split mode tensor), whose backend does not run the eviction's scoring op";
    }
    if (why) {
        kv_budget_fail(format("not supported for architecture %s, which uses %s (%s)", arch.c_str(), why,
                llama_kv_budget_accepted()));
    }

    // iSWA: the budget covers the full-attention layers; the sliding-window layers keep stock llama.cpp's bounded cache
    if (hparams.swa_type != LLAMA_SWA_TYPE_NONE) {
        bool any_full = false;
        for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
            any_full = any_full || !hparams.is_swa(il);
        }
        if (!any_full) {
            kv_budget_fail(format("not needed for architecture %s: every layer uses sliding-window attention, whose "
                    "cache llama.cpp already bounds (a budget covers full-attention layers)", arch.c_str()));
        }
    }
}

llama_kv_cache * llama_kv_budget_cache_of(llama_memory_i * mem) {
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base(); // the full-attention layers
    }
    return nullptr;
}

void llama_kv_budget_note_batch(llama_context * lctx, const llama_batch_ext & batch) {
    auto * kv = llama_kv_budget_cache_of(lctx->get_memory());
    if (!kv || !kv->budget_active()) {
        return;
    }
    std::vector<uint32_t> n_seq(kv->get_n_stream(), 0);
    for (const auto & tok : batch.tokens) {
        for (llama_seq_id seq_id : tok.seq_ids) {
            if (seq_id >= 0 && (uint32_t) seq_id < n_seq.size()) {
                n_seq[seq_id]++; // stream s holds sequence s
            }
        }
    }
    kv->budget_note_batch((int32_t) batch.tokens.size(), std::move(n_seq));
}

size_t llama_kv_budget_state::aux_bytes() const {
    size_t total = 0;
    for (const auto & [_, buf] : ctxs_bufs) {
        total += ggml_backend_buffer_get_size(buf.get());
    }
    return total;
}

//
// llama_kv_cache: budget members
//

// an F32 tensor over the bytes of t, [row bytes / 4, ne1, ne2], or null where t's per-head rows of d elements are
// not whole 4-byte words (or t is F32 already)
static ggml_tensor * kv_budget_bit_view(ggml_context * ctx, ggml_tensor * t, int64_t d) {
    if (t->type == GGML_TYPE_F32 || !t->buffer || !t->data || !ggml_is_contiguous(t) ||
            ggml_row_size(t->type, d) % sizeof(float) != 0 || t->nb[1] % sizeof(float) != 0) {
        return nullptr;
    }
    ggml_tensor * a = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, t->nb[1]/sizeof(float), t->ne[1], t->ne[2]);
    if (ggml_nbytes(a) != ggml_nbytes(t) || ggml_backend_tensor_alloc(t->buffer, a, t->data) != GGML_STATUS_SUCCESS) {
        return nullptr;
    }
    ggml_format_name(a, "%s_bits", t->name);
    return a;
}

// the gather moves kept rows through F32 views of K and V: a copy of their bytes, where get_rows + set_rows on
// the F16 or quantized tensors would convert every row to F32 and back (for quantized types, requantize it)
template <typename layers_t>
static void kv_budget_init_bit_views(llama_kv_budget_state & B, const layers_t & layers, const llama_hparams & hparams) {
    if (hparams.no_alloc || layers.empty()) {
        return;
    }
    ggml_init_params ip = {
        /*.mem_size   =*/ 2*layers.size()*ggml_tensor_overhead(),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };
    B.bits_ctx.reset(ggml_init(ip));
    if (!B.bits_ctx) {
        throw std::runtime_error("failed to create ggml context for the KV budget");
    }
    for (const auto & layer : layers) {
        B.k_bits.push_back(kv_budget_bit_view(B.bits_ctx.get(), layer.k, hparams.n_embd_head_k(layer.il)));
        B.v_bits.push_back(kv_budget_bit_view(B.bits_ctx.get(), layer.v, hparams.n_embd_head_v(layer.il)));
    }
}

void llama_kv_cache::budget_init(const llama_kv_budget_params & params) {
    GGML_ASSERT(params.enabled());
    GGML_ASSERT(!v_trans && "a KV budget needs the non-transposed V cache (flash attention)");
    GGML_ASSERT(!other);

    budget = std::make_unique<llama_kv_budget_state>();
    auto & B = *budget;
    B.params   = params;
    B.n_stream = n_stream;
    B.softcap  = hparams.attn_soft_cap ? hparams.f_attn_logit_softcapping : 0.0f; // what build_attn_mha passes to FA

    // one query window per layer, on the layer's buffer type, so scoring never leaves the device
    std::map<ggml_backend_buffer_type_t, ggml_context *> ctx_map;
    for (const auto & layer : layers) {
        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        auto it = ctx_map.find(buft);
        if (it == ctx_map.end()) {
            ggml_init_params ip = {
                /*.mem_size   =*/ (2*layers.size() + 1)*ggml_tensor_overhead(),
                /*.mem_buffer =*/ NULL,
                /*.no_alloc   =*/ true,
            };
            ggml_context * ctx = ggml_init(ip);
            if (!ctx) {
                throw std::runtime_error("failed to create ggml context for the KV budget");
            }
            it = ctx_map.emplace(buft, ctx).first;
        }
        const int64_t n_embd_q = (int64_t) hparams.n_embd_head_k(layer.il) * hparams.n_head(layer.il);
        ggml_tensor * q = ggml_new_tensor_2d(it->second, GGML_TYPE_F32, n_embd_q, (int64_t) params.n_q_rows()*n_stream);
        ggml_format_name(q, "kv_budget_q_win_l%d", layer.il);
        B.q_win.push_back(q);

        if (params.policy == LLAMA_KV_POLICY_H2O) {
            ggml_tensor * a = ggml_new_tensor_3d(it->second, GGML_TYPE_F32, get_size(), hparams.n_head_kv(layer.il), n_stream);
            ggml_format_name(a, "kv_budget_acc_l%d", layer.il);
            B.acc.push_back(a);
        }

        B.n_head_kv_max = std::max(B.n_head_kv_max, hparams.n_head_kv(layer.il));
        B.kq_scale.push_back(1.0f/sqrtf((float) hparams.n_embd_head_k(layer.il))); // until build_attn says
    }

    // the kept cells of every (layer, KV head), between the eviction's two graphs: with the last layer's K,
    // which is on the GPU whenever any layer is (partial offload keeps the first layers on the CPU)
    const bool split_gather = params.granularity == LLAMA_KV_GRANULARITY_HEAD &&
        params.policy != LLAMA_KV_POLICY_STREAMING && params.policy != LLAMA_KV_POLICY_H2O;
    if (split_gather && !layers.empty()) {
        int64_t n_rows_all = 0;
        for (const auto & layer : layers) {
            n_rows_all += hparams.n_head_kv(layer.il);
        }
        ggml_context * ctx = ctx_map.at(ggml_backend_buffer_get_type(layers.back().k->buffer));
        B.order_sel = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, params.budget + params.keep, n_rows_all);
        ggml_set_name(B.order_sel, "kv_budget_order_sel");
    }

    for (auto & [buft, ctx] : ctx_map) {
        ggml_backend_buffer_t buf;
        if (hparams.no_alloc) {
            buf = ggml_backend_buft_alloc_buffer(buft, 0);
            for (ggml_tensor * t = ggml_get_first_tensor(ctx); t != nullptr; t = ggml_get_next_tensor(ctx, t)) {
                t->buffer = buf;
            }
        } else {
            buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        }
        if (!buf) {
            ggml_free(ctx);
            throw std::runtime_error("failed to allocate the KV budget's query windows");
        }
        ggml_backend_buffer_clear(buf, 0);
        B.ctxs_bufs.emplace_back(ggml_context_ptr(ctx), ggml_backend_buffer_ptr(buf));
    }

    budget_init_scores();
    kv_budget_init_bit_views(B, layers, hparams);

    if (B.order_sel && !hparams.no_alloc) {
        // the order is read back on every eviction: into pinned memory where the device offers it (a direct
        // copy instead of one staged through a driver buffer)
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(B.order_sel->buffer));
        ggml_backend_buffer_type_t host_buft = dev ? ggml_backend_dev_host_buffer_type(dev) : nullptr;
        if (host_buft && !ggml_backend_buft_is_host(ggml_backend_buffer_get_type(B.order_sel->buffer))) {
            B.order_pinned.reset(ggml_backend_buft_alloc_buffer(host_buft, ggml_nbytes(B.order_sel)));
        }
    }

    B.streams.resize(n_stream);
    for (auto & S : B.streams) {
        S.comp_pos.assign((size_t) layers.size()*B.n_head_kv_max*get_size(), -1);
        S.comp_cell_pos.assign(get_size(), -1);
        S.acc_valid.assign(get_size(), 0);
        S.q_pos.assign(params.n_q_rows(), -1);
    }

    LLAMA_LOG_INFO("%s: KV budget active: %u cells x %u sequences, query windows %.2f MiB\n", __func__, get_size(), n_stream,
            B.aux_bytes()/1024.0/1024.0);
}

// the reducers of the fused scoring op
static ggml_kv_scores_reduce kv_budget_scores_reduce(llama_kv_fusion op) {
    return op == LLAMA_KV_FUSION_MAX ? GGML_KV_SCORES_REDUCE_MAX : GGML_KV_SCORES_REDUCE_SUM;
}

void llama_kv_cache::budget_init_scores() {
    auto & B = *budget;
    const auto & p = B.params;

    B.scores_fused.assign(layers.size(), 0);
    B.scores_fused_all = false;

    // the fused op on every layer whose K device supports it; the composed graph on the others
    const int64_t n_rows = p.n_q_rows();

    // ask each layer's K device once, with the shapes of an eviction over the whole cache
    ggml_init_params ip = {
        /*.mem_size   =*/ 8*ggml_tensor_overhead(),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ true,
    };

    uint32_t n_fused = 0;
    for (size_t ikv = 0; ikv < layers.size(); ++ikv) {
        const auto & layer = layers[ikv];
        const uint32_t il = layer.il;

        ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(layer.k->buffer);
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        if (!dev && ggml_backend_buft_is_host(buft)) {
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU); // the CPU buffer type names no device
        }
        if (!dev) {
            continue;
        }

        ggml_context_ptr ctx_ptr { ggml_init(ip) };
        ggml_context * ctx = ctx_ptr.get();
        GGML_ASSERT(ctx);

        const int64_t d_k   = hparams.n_embd_head_k(il);
        const int64_t n_hkv = hparams.n_head_kv(il);
        const int64_t n_kv  = get_size();

        ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d_k, hparams.n_head(il), n_rows);
        ggml_tensor * k = ggml_view_3d(ctx, layer.k, d_k, n_kv, n_hkv,
                ggml_row_size(layer.k->type, hparams.n_embd_k_gqa(il)), ggml_row_size(layer.k->type, d_k), 0);
        ggml_tensor * mask  = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_kv, n_rows);
        ggml_tensor * row_w = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, n_rows);
        ggml_tensor * op = ggml_kv_scores(ctx, q, k, mask, row_w, 1.0f, B.softcap,
                kv_budget_scores_reduce(p.fusion), kv_budget_scores_reduce(p.group_reduce));

        if (ggml_backend_dev_supports_op(dev, op)) {
            B.scores_fused[ikv] = 1;
            n_fused++;
        }
    }
    B.scores_fused_all = !layers.empty() && n_fused == layers.size();

    LLAMA_LOG_INFO("%s: KV budget scoring: fused op on %u/%zu layers%s\n", __func__, n_fused, layers.size(),
            n_fused < layers.size() ? " (the other layers' devices lack the op: composed graph)" : "");
}

uint32_t llama_kv_cache::budget_n_head_kv(uint32_t ikv) const {
    return hparams.n_head_kv(layers.at(ikv).il);
}

void llama_kv_budget_stream::reset() {
    std::fill(comp_cell_pos.begin(), comp_cell_pos.end(), -1);
    std::fill(acc_valid.begin(), acc_valid.end(), 0);
    std::fill(q_pos.begin(), q_pos.end(), -1);
    last_evict_pos_max = -1;
    compressed = false;
    keep = {};
}

// the sequence stream s holds: a budget needs a cache per sequence (or one sequence), so stream s holds sequence s
static llama_seq_id kv_budget_stream_seq(uint32_t s) {
    return (llama_seq_id) s;
}

// cells an eviction of stream s keeps: C, and the prompt tokens kept besides them (kv_keep)
static uint32_t kv_budget_n_keep(const llama_kv_budget_state & B, uint32_t s) {
    return B.params.budget + B.streams[s].keep.n_kept();
}

bool llama_kv_budget_keep::add(llama_pos pos, bool prompt, uint32_t cap) {
    if (!prompt) {
        answered = answered || first_p1 > first_p0;
        return false;
    }
    if (answered) {
        // a new user turn: the previous one (not the first prompt) is released
        first_done = true;
        answered   = false;
        overflow   = false;
        last_p0 = last_p1 = pos;
    }
    llama_pos & p0 = first_done ? last_p0 : first_p0;
    llama_pos & p1 = first_done ? last_p1 : first_p1;
    if (p1 == p0) {
        p0 = p1 = pos;
    }
    if (pos != p1) {
        return false; // already kept (decoded again after a removal), or not contiguous with the prompt
    }
    if (n_kept() < cap) {
        p1 = pos + 1;
        return false;
    }
    const bool first = !overflow;
    overflow = true;
    return first;
}

bool llama_kv_cache::budget_stream_due(uint32_t s, bool optimize) const {
    const auto & p = budget->params;
    const uint32_t n_used = v_cells[s].get_used();
    if (n_used <= kv_budget_n_keep(*budget, s)) {
        return false;
    }
    if (p.policy == LLAMA_KV_POLICY_SNAPKV) {
        // once, when the prompt is done: before the first single-token batch (or when it no longer fits)
        return !budget->streams[s].compressed && (optimize || budget->n_batch_tokens == 1);
    }
    // optimize: a ubatch found no free slot (decode's retry path)
    return optimize || p.full(n_used, budget->streams[s].keep.n_kept());
}

std::vector<uint32_t> llama_kv_cache::budget_streams_due(bool optimize) const {
    std::vector<uint32_t> res;
    for (uint32_t s = 0; budget && s < n_stream; ++s) {
        if (budget_stream_due(s, optimize)) {
            res.push_back(s);
        }
    }
    return res;
}

// what an eviction leaves in a stream's cells, for planning: C cells in use, at [0, C), holding (as far as the
// plan cares) the newest positions; the real eviction's positions and, per token, its layout may differ: the
// slots after an eviction are found again when it has run (budget_before_ubatch)
static void kv_budget_plan_evict(llama_kv_cells & cells, uint32_t & head, uint32_t n_keep, llama_seq_id seq) {
    const llama_pos pos_max = cells.seq_pos_max(seq);
    cells.reset();
    for (uint32_t r = 0; r < n_keep; ++r) {
        cells.pos_set(r, std::max<llama_pos>(0, pos_max - (llama_pos) (n_keep - 1 - r)));
        cells.seq_add(r, seq);
    }
    head = n_keep;
}

llama_kv_cache::slot_info_vec_t llama_kv_cache::budget_prepare(const std::vector<llama_ubatch> & ubatches,
        std::vector<std::vector<uint32_t>> & evict_before) {
    auto & B = *budget;
    const auto & p = B.params;

    evict_before.clear();
    // one ubatch: the update before the batch evicted what was due (and, if it does not fit, decode's retry does)
    if (ubatches.size() < 2 || !p.evicts_between_ubatches()) {
        return prepare(ubatches);
    }

    // the plan places the ubatches in the real cells, which it restores at the end
    const std::vector<llama_kv_cells> cells_old = v_cells;
    const std::vector<uint32_t> heads_old = v_heads;
    struct marks { std::vector<llama_pos> comp_cell_pos; std::vector<uint8_t> acc_valid; llama_kv_budget_keep keep; };
    std::vector<marks> marks_old; // what apply_ubatch changes
    for (const auto & S : B.streams) {
        marks_old.push_back({ S.comp_cell_pos, S.acc_valid, S.keep });
    }

    slot_info_vec_t res;
    evict_before.assign(ubatches.size(), {});
    for (size_t i = 0; i < ubatches.size(); ++i) {
        const auto & ubatch = ubatches[i];
        // the streams of the ubatch's sequences
        std::vector<uint32_t> strms;
        for (uint32_t k = 0; k < ubatch.n_seqs_unq; ++k) {
            strms.push_back(seq_to_stream[ubatch.seq_id_unq[k]]);
        }
        // as between two batches: evict a stream once C + S of its cells are in use, or, when the ubatch does
        // not fit, every stream of the ubatch that holds more than C
        auto & evict = evict_before[i];
        for (uint32_t s : strms) {
            if (i > 0 && p.full(v_cells[s].get_used(), B.streams[s].keep.n_kept())) {
                evict.push_back(s);
            }
        }
        slot_info sinfo;
        if (evict.empty()) {
            sinfo = find_slot(ubatch, false);
            for (uint32_t s : strms) {
                if (sinfo.empty() && i > 0 && v_cells[s].get_used() > kv_budget_n_keep(B, s)) {
                    evict.push_back(s);
                }
            }
        }
        if (!evict.empty()) {
            for (uint32_t s : evict) {
                kv_budget_plan_evict(v_cells[s], v_heads[s], kv_budget_n_keep(B, s), kv_budget_stream_seq(s));
            }
            sinfo = find_slot(ubatch, false);
        }
        if (sinfo.empty()) {
            res.clear();
            break;
        }
        res.push_back(sinfo);
        apply_ubatch(sinfo, ubatch);
    }

    v_cells = cells_old;
    v_heads = heads_old;
    for (uint32_t s = 0; s < n_stream; ++s) {
        B.streams[s].comp_cell_pos = std::move(marks_old[s].comp_cell_pos);
        B.streams[s].acc_valid     = std::move(marks_old[s].acc_valid);
        B.streams[s].keep          = marks_old[s].keep;
    }

    return res;
}

bool llama_kv_cache::budget_before_ubatch(const std::vector<uint32_t> & evict, bool & evicted, slot_info & sinfo,
        const llama_ubatch & ubatch) {
    GGML_ASSERT(budget);
    if (!evict.empty()) {
        llama_context * lctx = budget->lctx;
        if (!lctx || !budget_evict(lctx, evict)) {
            LLAMA_LOG_ERROR("%s: the eviction planned between two ubatches did not run\n", __func__);
            return false;
        }
        lctx->reset_gf_res_prev(); // the eviction's graphs reset the scheduler
        evicted = true;
    }
    if (evicted) {
        sinfo = find_slot(ubatch, false);
        if (sinfo.empty()) {
            LLAMA_LOG_ERROR("%s: no slot for a ubatch of %u tokens after an eviction\n", __func__, ubatch.n_tokens);
            return false;
        }
    }
    return true;
}

bool llama_kv_cache_context::needs_graph_reserve() const {
    // an update that only evicts changes no shape of the worst-case graph: its graphs went through the
    // context's scheduler, but the next graph's allocation plans the compute buffer again by itself, so
    // reserving the worst case (a ubatch-sized graph built and planned) after every eviction is host time
    // spent on nothing
    return do_shift || !sc_info.empty() || evict_streams.empty();
}

llama_pos llama_kv_cache::budget_orig_pos(uint32_t s, uint32_t ikv, uint32_t h, uint32_t i) const {
    const auto & cells = v_cells[s];
    if (cells.is_empty(i)) {
        return -1;
    }
    const llama_pos pos = cells.pos_get(i);
    if (budget && budget->streams[s].comp_cell_pos[i] >= 0) {
        return budget->streams[s].comp_pos[((size_t) ikv*budget->n_head_kv_max + h)*get_size() + i];
    }
    return pos;
}

// the query window keeps the last min(W, n) of each sequence's n tokens in the ubatch: one stream takes the
// ubatch's last tokens (a simple split: one sequence), several take the tail of each sequence's equal share
// (split_equal lays the sequences out one after the other); q_idxs is I64 [kept per sequence, sequences]
ggml_tensor * llama_kv_cache::build_input_q_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const {
    if (!budget) {
        return nullptr;
    }
    const bool per_seq = n_stream > 1 && ubatch.equal_seqs();
    const uint32_t n_seqs   = per_seq ? ubatch.n_seqs : 1;
    const uint32_t n_tokens = per_seq ? ubatch.n_seq_tokens : ubatch.n_tokens;
    const uint32_t n_keep   = std::min(n_tokens, budget->params.n_q_rows());
    ggml_tensor * idxs = ggml_new_tensor_2d(ctx, GGML_TYPE_I64, n_keep, n_seqs);
    ggml_set_input(idxs);
    return idxs;
}

void llama_kv_cache::set_input_q_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    GGML_ASSERT(budget);
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));

    int64_t * data = (int64_t *) dst->data;
    const uint32_t n_keep = dst->ne[0];
    const uint32_t n_seqs = dst->ne[1];
    const uint32_t n_rows = budget->params.n_q_rows();
    const uint32_t n_seq_tokens = ubatch->n_tokens/n_seqs;
    GGML_ASSERT(n_keep <= n_seq_tokens && n_seqs*n_seq_tokens == ubatch->n_tokens);

    // a sequence's positions are consecutive, so its last <= n_rows tokens land on distinct slots of its stream's rows
    for (uint32_t k = 0; k < n_seqs; ++k) {
        for (uint32_t j = 0; j < n_keep; ++j) {
            const uint32_t t = k*n_seq_tokens + n_seq_tokens - n_keep + j;
            const uint32_t s = seq_to_stream[ubatch->seq_id[t][0]];
            const uint32_t r = ubatch->pos[t] % n_rows;
            data[k*n_keep + j] = (int64_t) s*n_rows + r;
            budget->streams[s].q_pos[r] = ubatch->pos[t]; // the graph about to run writes it
        }
    }
}

ggml_tensor * llama_kv_cache::cpy_q(ggml_context * ctx, ggml_tensor * q_cur, ggml_tensor * q_idxs, float kq_scale, int32_t il) const {
    GGML_ASSERT(budget && q_idxs);

    const int32_t ikv = map_layer_ids.at(il);
    ggml_tensor * dst = budget->q_win[ikv];

    // the eviction scores q.k at the temperature of the model's own attention (graphs are built before any
    // eviction runs: the first decode sets it)
    budget->kq_scale[ikv] = kq_scale;

    const int64_t n_embd_q = q_cur->ne[0]*q_cur->ne[1];
    const int64_t n_tokens = q_cur->ne[2];
    const int64_t n_keep   = q_idxs->ne[0];
    const int64_t n_seqs   = q_idxs->ne[1];
    const int64_t n_seq_tokens = n_tokens/n_seqs;
    GGML_ASSERT(n_embd_q == dst->ne[0]);
    GGML_ASSERT(n_keep <= n_seq_tokens && n_seqs*n_seq_tokens == n_tokens);

    ggml_tensor * q = q_cur;
    if (!ggml_is_contiguous(q)) {
        q = ggml_cont(ctx, q);
    }
    // the last n_keep rows of each sequence's n_seq_tokens
    q = ggml_view_3d(ctx, q, n_embd_q, n_keep, n_seqs, q->nb[2], n_seq_tokens*q->nb[2], (n_seq_tokens - n_keep)*q->nb[2]);
    if (n_seqs > 1 && n_keep < n_seq_tokens) {
        q = ggml_cont(ctx, q);
    }
    q = ggml_reshape_2d(ctx, q, n_embd_q, n_keep*n_seqs);
    if (q->type != GGML_TYPE_F32) {
        q = ggml_cast(ctx, q, GGML_TYPE_F32);
    }

    return ggml_set_rows(ctx, dst, q, ggml_reshape_1d(ctx, q_idxs, n_keep*n_seqs));
}

namespace {

// which part of an eviction a graph holds: one graph does it all, or, with the kept cells held on the
// device between two graphs (B.order_sel), the first selects them and the second moves the rows while
// the host rewrites the cell metadata
enum kv_evict_graph {
    KV_EVICT_GRAPH_ALL,    // scores, order, gather
    KV_EVICT_GRAPH_ORDER,  // scores, order into B.order_sel
    KV_EVICT_GRAPH_GATHER, // the gather of the cells in B.order_sel
};

// host-built inputs of the eviction graph
class llm_graph_input_kv_budget : public llm_graph_input_i {
public:
    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        set(mask, mask_data);
        set(bias, bias_data);
        set(evictable, evictable_data);
        set(dst, dst_data);
        set(row_w, row_w_data);
        set(old, old_data);
    }

    ggml_tensor * mask  = nullptr; // F32 [n_kv, n_rows]: 0 for the cells a query row scores, -inf otherwise
    ggml_tensor * bias  = nullptr; // F32 [n_kv, 1]: 0 evictable (streaming: recency), BIG + rank protected, -inf empty
    ggml_tensor * dst   = nullptr; // I64 [C]: destination cells of the kept rows (head granularity)
    ggml_tensor * row_w = nullptr; // F32 [1, n_rows]: 1 for a row that scores (H2O: the queries since the last
                                   // eviction), 0 otherwise (a rejected draft's query)
    ggml_tensor * old   = nullptr; // H2O: F32 [n_kv, 1]: 1 where the accumulated score is valid, 0 for newer cells
    ggml_tensor * evictable = nullptr; // H2O, SnapKV: F32 [n_kv, 1]: 1 evictable, 0 otherwise (protected order stays exact)

    std::vector<float>   mask_data;
    std::vector<float>   bias_data;
    std::vector<int64_t> dst_data;
    std::vector<float>   row_w_data;
    std::vector<float>   old_data;
    std::vector<float>   evictable_data;

private:
    // each graph creates only the inputs it uses
    template <typename T>
    static void set(ggml_tensor * t, const std::vector<T> & data) {
        if (t && t->buffer) {
            GGML_ASSERT(data.size()*sizeof(T) == ggml_nbytes(t));
            ggml_backend_tensor_set(t, data.data(), 0, ggml_nbytes(t));
        }
    }
};

// reduce dim 0 of t ([n, ...]) with sum or max -> [1, ...]
ggml_tensor * kv_budget_reduce_rows(ggml_context * ctx, ggml_tensor * t, llama_kv_fusion op) {
    if (op == LLAMA_KV_FUSION_SUM) {
        return ggml_sum_rows(ctx, t);
    }
    const int64_t n = t->ne[0];
    ggml_tensor * t2 = ggml_reshape_2d(ctx, t, n, ggml_nelements(t)/n);
    ggml_tensor * r  = ggml_pool_1d(ctx, t2, GGML_OP_POOL_MAX, (int) n, (int) n, 0);
    return ggml_reshape_4d(ctx, r, 1, t->ne[1], t->ne[2], t->ne[3]);
}

// concatenate [n, rows_i] tensors along dim 1, pairwise (each row copied log2(count) times, not count times)
ggml_tensor * kv_budget_concat_rows(ggml_context * ctx, std::vector<ggml_tensor *> ts) {
    GGML_ASSERT(!ts.empty());
    while (ts.size() > 1) {
        std::vector<ggml_tensor *> next;
        for (size_t i = 0; i + 1 < ts.size(); i += 2) {
            next.push_back(ggml_concat(ctx, ts[i], ts[i + 1], 1));
        }
        if (ts.size() % 2) {
            next.push_back(ts.back());
        }
        ts.swap(next);
    }
    return ts[0];
}

// the scoring graph the fused ggml_kv_scores op replaces: q [d, n_head, n_rows], k [d, n_kv, n_head_kv],
// mask [n_kv, n_rows], row_w [1, n_rows] or null -> scores [n_kv, n_head_kv] (query head h reads KV head h/n_grp)
ggml_tensor * kv_budget_scores_composed(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * mask,
        ggml_tensor * row_w, float scale, float softcap, llama_kv_fusion fusion, llama_kv_fusion group) {
    const int64_t n_kv   = k->ne[1];
    const int64_t n_hkv  = k->ne[2];
    const int64_t n_rows = q->ne[2];
    const int64_t n_grp  = q->ne[1]/n_hkv;

    ggml_tensor * kq = ggml_mul_mat(ctx, k, ggml_permute(ctx, q, 0, 2, 1, 3)); // [n_kv, n_rows, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    if (softcap > 0.0f) {
        kq = ggml_tanh(ctx, ggml_scale(ctx, kq, scale/softcap)); // as build_attn_mha caps the logits
        scale = softcap;
    }
    kq = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
    if (row_w) {
        kq = ggml_mul(ctx, kq, row_w);
    }

    // fuse over the query rows, then over the query heads of each KV head
    ggml_tensor * a = ggml_reshape_4d(ctx, kq, n_kv, n_rows, n_grp, n_hkv);
    a = ggml_cont(ctx, ggml_transpose(ctx, a));                      // [n_rows, n_kv, n_grp, n_hkv]
    a = kv_budget_reduce_rows(ctx, a, fusion);                       // [1, n_kv, n_grp, n_hkv]
    if (n_grp > 1) {
        a = ggml_reshape_3d(ctx, a, n_kv, n_grp, n_hkv);
        a = ggml_cont(ctx, ggml_transpose(ctx, a));                  // [n_grp, n_kv, n_hkv]
        a = kv_budget_reduce_rows(ctx, a, group);                    // [1, n_kv, n_hkv]
    }
    return ggml_reshape_2d(ctx, a, n_kv, n_hkv);
}

// [d, n_kv, n_head_kv] view of a layer's K or V rows in stream s (cell i of KV head h at row i, head offset d)
ggml_tensor * kv_budget_heads_view(ggml_context * ctx, ggml_tensor * t, int64_t d, int64_t n_kv, int64_t n_hkv, int64_t n_embd_gqa,
        uint32_t s) {
    return ggml_view_3d(ctx, t, d, n_kv, n_hkv, ggml_row_size(t->type, n_embd_gqa), ggml_row_size(t->type, d), s*t->nb[2]);
}

} // namespace

// the protected cells (recent window + sinks) get scores above any attention score, increasing with
// their position, so every head orders them identically and they land on the same cells
static constexpr float KV_BUDGET_PROTECTED_BIAS = 1e6f;

// one eviction, in stages: inputs (host), the scoring graph and the order of the cells, the read-back of
// the order, the gather of the kept rows, the cell metadata. The policies differ in small pieces: the
// mask of the query rows (H2O: causal, weighted), the scores of one layer (H2O accumulates, SnapKV
// smooths, streaming has none) and whether the heads choose apart (head granularity) or together.
struct llama_kv_budget_evict {
    llama_kv_budget_evict(llama_kv_cache & kv, llama_context * lctx, uint32_t strm);

    bool run();

private:
    void plan_cells();
    void fill_inputs();
    void fill_inputs_h2o();

    ggml_tensor * layer_scores(ggml_context * ctx, llm_graph_input_kv_budget * inp, size_t ikv, ggml_tensor ** acc_now) const;
    void build_order (ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_budget * inp, std::vector<ggml_tensor *> & layer_acc);
    void build_gather(ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_budget * inp, const std::vector<ggml_tensor *> & layer_acc) const;
    ggml_cgraph * build_graph(kv_evict_graph kind);
    bool compute(ggml_cgraph * gf, bool wait);

    void read_order();
    void rewrite_token();
    void rewrite_head();
    void rewrite_layers(int iw, int n_workers, const std::vector<llama_pos> & cell_pos, llama_pos * new_pos, uint8_t & bad);
    void log_done() const;

    llama_kv_cache        & kv;
    llama_kv_budget_state & B;
    const llama_kv_budget_params & p;
    const uint32_t          strm; // the stream (sequence) evicted
    const llama_seq_id      seq;
    llama_kv_budget_stream & S;
    llama_kv_cells        & cells;
    llama_context         * lctx;

    uint32_t  n_used, n_kv, n_keep, n_rows, n_mask_rows;
    llama_pos pos_max;
    bool streaming, h2o, snapkv;
    bool per_head; // every KV head keeps its own cells (composite cells); else cells are freed for all heads
    bool split;    // per head in two graphs: the device gathers while the host rewrites the metadata

    std::vector<std::pair<llama_pos, uint32_t>> prot; // protected cells (pos, cell), oldest first
    std::vector<float> row;                           // mask row of MorphKV/SnapKV: 0 evictable, -inf otherwise
    std::vector<size_t> row_off;                      // per head: each layer's first row of the order

    std::unique_ptr<llm_graph_input_kv_budget> inp_host; // taken by the graph that gathers
    ggml_tensor * order_all   = nullptr; // per head, one graph: I32 [n_kv, rows of all layers]
    ggml_tensor * total_order = nullptr; // per token: I32 [n_kv, 1]

    const int32_t * orders_host = nullptr; // per head: the kept cells of every (layer, KV head), row by row
    size_t order_stride = 0;

    int64_t t_prev_us = 0, t_start_us = 0, t_inputs_us = 0, t_order_us = 0, t_read_us = 0, t_gather_us = 0, t_meta_us = 0, t_wait_us = 0;
};

llama_kv_budget_evict::llama_kv_budget_evict(llama_kv_cache & kv, llama_context * lctx, uint32_t strm) :
        kv(kv), B(*kv.budget), p(kv.budget->params), strm(strm), seq(kv_budget_stream_seq(strm)), S(kv.budget->streams[strm]),
        cells(kv.v_cells[strm]), lctx(lctx) {
    // the previous ubatch's graph may still run: wait for it here, so that the stages time the eviction alone
    t_start_us = ggml_time_us();
    ggml_backend_sched_synchronize(lctx->get_sched());
    t_prev_us  = ggml_time_us() - t_start_us;
    t_start_us += t_prev_us;

    n_used  = cells.get_used();
    n_kv    = cells.used_max_p1();
    n_keep  = kv_budget_n_keep(B, strm);
    n_rows  = p.n_q_rows();
    pos_max = cells.seq_pos_max(seq);

    streaming = p.policy == LLAMA_KV_POLICY_STREAMING;
    h2o       = p.policy == LLAMA_KV_POLICY_H2O;
    snapkv    = p.policy == LLAMA_KV_POLICY_SNAPKV;
    // streaming keeps the same tokens in every head: freeing cells is enough
    per_head  = p.granularity == LLAMA_KV_GRANULARITY_HEAD && !streaming;
    // H2O's accumulated scores, which move with the cells, exist only inside one graph
    split     = per_head && B.order_sel != nullptr;
    GGML_ASSERT(!split || !h2o);
    // MorphKV, SnapKV: every query row sees the same cells, and the fused op takes one mask row for all
    n_mask_rows = !h2o && B.scores_fused_all ? 1 : n_rows;

    row_off.assign(kv.layers.size() + 1, 0);
    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        row_off[ikv + 1] = row_off[ikv] + kv.hparams.n_head_kv(kv.layers[ikv].il);
    }
}

bool llama_kv_budget_evict::run() {
    if (!B.warned_train_ctx && pos_max >= (llama_pos) kv.hparams.n_ctx_train) {
        LLAMA_LOG_WARN("%s: position %d is past the model's trained context (%u): quality may degrade\n",
                __func__, pos_max, kv.hparams.n_ctx_train);
        B.warned_train_ctx = true;
    }

    plan_cells();
    fill_inputs();
    int64_t t0 = ggml_time_us();
    t_inputs_us = t0 - t_start_us;

    if (split) {
        // the order first; then the device gathers while the metadata is rewritten below
        if (!compute(build_graph(KV_EVICT_GRAPH_ORDER), true)) {
            return false;
        }
        const int64_t t1 = ggml_time_us();
        read_order();
        const int64_t t2 = ggml_time_us();
        if (!compute(build_graph(KV_EVICT_GRAPH_GATHER), false)) {
            return false;
        }
        t_order_us  = t1 - t0;
        t_read_us   = t2 - t1;
        t_gather_us = ggml_time_us() - t2;
    } else {
        if (!compute(build_graph(KV_EVICT_GRAPH_ALL), true)) {
            return false;
        }
        const int64_t t1 = ggml_time_us();
        read_order();
        t_gather_us = t1 - t0;
        t_read_us   = ggml_time_us() - t1;
    }
    const int64_t t1 = ggml_time_us();

    if (per_head) {
        rewrite_head();
    } else {
        rewrite_token();
    }
    t0 = ggml_time_us();
    t_meta_us = t0 - t1;

    if (split) {
        ggml_backend_sched_synchronize(lctx->get_sched()); // the gather (the next graph may reuse its buffers)
    }
    t_wait_us = ggml_time_us() - t0;

    S.n_evictions++;
    S.last_evict_pos_max = pos_max;
    S.compressed = true;
    S.t_evict_us += ggml_time_us() - t_start_us;

    log_done();
    return true;
}

// classify the cells: empty, protected (recent window, sinks) or evictable
void llama_kv_budget_evict::plan_cells() {
    const float ninf = -std::numeric_limits<float>::infinity();

    inp_host = std::make_unique<llm_graph_input_kv_budget>();
    auto & bias = inp_host->bias_data;

    row.assign(n_kv, 0.0f);
    bias.assign(n_kv, 0.0f);
    for (uint32_t i = 0; i < n_kv; ++i) {
        if (cells.is_empty(i)) {
            row[i]  = ninf;
            bias[i] = ninf;
            continue;
        }
        const llama_pos pos = cells.pos_get(i);
        const bool composite = S.comp_cell_pos[i] >= 0;
        if (!composite && (pos > pos_max - (llama_pos) p.n_recent() || pos < (llama_pos) p.sinks || S.keep.kept(pos))) {
            row[i] = ninf;
            prot.emplace_back(pos, i);
        } else if (streaming) {
            bias[i] = (float) (pos + 1)/(float) (pos_max + 2); // the most recent first
        }
    }
    std::sort(prot.begin(), prot.end());
    GGML_ASSERT(prot.size() < n_keep); // configure: budget > recent + sinks; the kept prompt is counted in n_keep
    for (uint32_t r = 0; r < prot.size(); ++r) {
        bias[prot[r].second] = KV_BUDGET_PROTECTED_BIAS + (float) r;
    }
}

void llama_kv_budget_evict::fill_inputs() {
    auto & inp = *inp_host;

    if (h2o) {
        fill_inputs_h2o();
    } else {
        // MorphKV, SnapKV: softmax of every window query over the evictable cells; a row whose query is of a
        // position the cache no longer holds (a rejected draft token) or of none weighs 0
        inp.mask_data.resize((size_t) n_kv*n_mask_rows);
        for (uint32_t r = 0; r < n_mask_rows; ++r) {
            std::copy(row.begin(), row.end(), inp.mask_data.begin() + (size_t) r*n_kv);
        }
        inp.row_w_data.resize(n_rows);
        for (uint32_t r = 0; r < n_rows; ++r) {
            const llama_pos q = S.q_pos[r];
            inp.row_w_data[r] = q >= 0 && q <= pos_max && q > pos_max - (llama_pos) n_rows ? 1.0f : 0.0f;
        }
    }
    if (h2o || snapkv) {
        inp.evictable_data.resize(n_kv);
        for (uint32_t i = 0; i < n_kv; ++i) {
            inp.evictable_data[i] = std::isinf(row[i]) ? 0.0f : 1.0f;
        }
    }
    if (per_head) {
        inp.dst_data.resize(n_keep);
        for (uint32_t r = 0; r < n_keep; ++r) {
            inp.dst_data[r] = r;
        }
    }
}

// H2O: every query since the last eviction adds its attention (causal, over all cells); ring slot r holds
// the newest position p with p % n_rows == r
void llama_kv_budget_evict::fill_inputs_h2o() {
    auto & inp = *inp_host;
    const float ninf = -std::numeric_limits<float>::infinity();

    inp.mask_data.resize((size_t) n_kv*n_rows);
    inp.row_w_data.assign(n_rows, 0.0f);
    inp.old_data.resize(n_kv);
    for (uint32_t i = 0; i < n_kv; ++i) {
        inp.old_data[i] = S.acc_valid[i] ? 1.0f : 0.0f;
    }
    for (uint32_t r = 0; r < n_rows; ++r) {
        const llama_pos p_r = pos_max - (llama_pos) ((pos_max % n_rows + n_rows - r) % n_rows);
        // (a row whose query is not p_r's: a rejected draft's, removed from the cache, is not counted)
        const bool counted  = p_r >= 0 && p_r > S.last_evict_pos_max && S.q_pos[r] == p_r;
        inp.row_w_data[r]   = counted ? 1.0f : 0.0f;
        float * m = inp.mask_data.data() + (size_t) r*n_kv;
        for (uint32_t i = 0; i < n_kv; ++i) {
            // rows not counted still need a finite softmax: they see every live cell
            m[i] = !cells.is_empty(i) && (!counted || cells.pos_get(i) <= p_r) ? 0.0f : ninf;
        }
    }
}

// the scores [n_kv, n_head_kv] of one layer's cells; *acc_now: H2O's accumulated scores, which move with
// the cells (before the protected cells are zeroed)
ggml_tensor * llama_kv_budget_evict::layer_scores(ggml_context * ctx, llm_graph_input_kv_budget * inp, size_t ikv,
        ggml_tensor ** acc_now) const {
    const auto & hparams = kv.hparams;
    const auto & layer = kv.layers[ikv];
    const uint32_t il = layer.il;

    const int64_t d_k   = hparams.n_embd_head_k(il);
    const int64_t n_h   = hparams.n_head(il);
    const int64_t n_hkv = hparams.n_head_kv(il);
    GGML_ASSERT(n_h % n_hkv == 0);

    // [d, n_head, n_rows] queries (the ring) and [d, n_kv, n_head_kv] keys (query head h reads KV head h/n_grp)
    ggml_tensor * q = ggml_view_3d(ctx, B.q_win[ikv], d_k, n_h, n_rows,
            ggml_row_size(GGML_TYPE_F32, d_k), B.q_win[ikv]->nb[1], (size_t) strm*n_rows*B.q_win[ikv]->nb[1]);
    ggml_tensor * k = kv_budget_heads_view(ctx, layer.k, d_k, n_kv, n_hkv, hparams.n_embd_k_gqa(il), strm);

    // softmax of every query row over the cells, fused over the rows (H2O: the weighted sum of the queries
    // since the last eviction), then over the query heads of each KV head
    const float kq_scale = B.kq_scale[ikv];
    const llama_kv_fusion fusion = h2o ? LLAMA_KV_FUSION_SUM : p.fusion;
    const llama_kv_fusion group  = h2o ? LLAMA_KV_FUSION_SUM : p.group_reduce;
    ggml_tensor * row_w = inp->row_w;

    ggml_tensor * scores = B.scores_fused[ikv]
        ? ggml_kv_scores(ctx, q, k, inp->mask, row_w, kq_scale, B.softcap,
                kv_budget_scores_reduce(fusion), kv_budget_scores_reduce(group))
        : kv_budget_scores_composed(ctx, q, k, inp->mask, row_w, kq_scale, B.softcap, fusion, group);

    if (h2o) {
        // the scores accumulated before (valid cells only) + the attention since
        ggml_tensor * acc_view = ggml_view_2d(ctx, B.acc[ikv], n_kv, n_hkv, B.acc[ikv]->nb[1], strm*B.acc[ikv]->nb[2]);
        scores = ggml_add(ctx, ggml_mul(ctx, acc_view, inp->old), scores);
    }
    if (snapkv) {
        // SnapKV's smoothing: max over 5 neighbouring cells (position order for a prompt in an empty cache)
        scores = ggml_pool_1d(ctx, scores, GGML_OP_POOL_MAX, 5, 1, 2);
    }
    *acc_now = scores;
    if (h2o || snapkv) {
        scores = ggml_mul(ctx, scores, inp->evictable); // protected cells: only their bias orders them
    }
    return scores;
}

// the order of the cells: per head one argsort over every layer's rows (one launch, one copy back), per
// token one over the scores summed over layers and heads; streaming orders by the bias alone
void llama_kv_budget_evict::build_order(ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_budget * inp,
        std::vector<ggml_tensor *> & layer_acc) {
    std::vector<ggml_tensor *> per_layer; // per head: [n_kv, n_hkv] per layer
    ggml_tensor * total = nullptr;        // per token: [n_kv, 1]

    for (size_t ikv = 0; ikv < (streaming ? 0 : kv.layers.size()); ++ikv) {
        ggml_tensor * acc_now = nullptr;
        ggml_tensor * scores  = layer_scores(ctx, inp, ikv, &acc_now);
        if (per_head) {
            per_layer.push_back(ggml_is_contiguous(scores) ? scores : ggml_cont(ctx, scores));
            layer_acc[ikv] = acc_now;
            continue;
        }
        if (h2o) {
            // cells stay where they are: the accumulated scores too
            ggml_tensor * acc_view = ggml_view_2d(ctx, B.acc[ikv], n_kv, scores->ne[1], B.acc[ikv]->nb[1], strm*B.acc[ikv]->nb[2]);
            ggml_build_forward_expand(gf, ggml_cpy(ctx, acc_now, acc_view));
        }
        ggml_tensor * s = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, scores))); // [1, n_kv]
        s = ggml_reshape_2d(ctx, s, n_kv, 1);
        total = total ? ggml_add(ctx, total, s) : s;
    }

    if (!per_head) {
        total = total ? ggml_add(ctx, total, inp->bias) : inp->bias;
        total_order = ggml_argsort(ctx, total, GGML_SORT_ORDER_DESC);
        ggml_set_output(total_order);
        ggml_build_forward_expand(gf, total_order);
        return;
    }

    order_all = ggml_argsort(ctx, ggml_add(ctx, kv_budget_concat_rows(ctx, per_layer), inp->bias), GGML_SORT_ORDER_DESC);
    if (split) {
        // the kept cells stay on the device for the gather graph (and are read back from there)
        ggml_build_forward_expand(gf, ggml_cpy(ctx,
                ggml_view_2d(ctx, order_all,   n_keep, order_all->ne[1], order_all->nb[1],   0),
                ggml_view_2d(ctx, B.order_sel, n_keep, order_all->ne[1], B.order_sel->nb[1], 0)));
    } else {
        ggml_set_output(order_all);
        ggml_build_forward_expand(gf, order_all);
    }
}

// every head's kept K/V rows (and H2O's accumulated scores) written to cells [0, C): composite cells
void llama_kv_budget_evict::build_gather(ggml_context * ctx, ggml_cgraph * gf, llm_graph_input_kv_budget * inp,
        const std::vector<ggml_tensor *> & layer_acc) const {
    const auto & hparams = kv.hparams;
    const int64_t kv_size = kv.get_size();
    ggml_tensor * order = split ? B.order_sel : order_all;

    for (size_t ikv = 0; ikv < kv.layers.size(); ++ikv) {
        const auto & layer = kv.layers[ikv];
        const uint32_t il = layer.il;

        const int64_t d_k   = hparams.n_embd_head_k(il);
        const int64_t d_v   = hparams.n_embd_head_v(il);
        const int64_t n_hkv = hparams.n_head_kv(il);

        ggml_tensor * sel = ggml_view_2d(ctx, order, n_keep, n_hkv, order->nb[1], row_off[ikv]*order->nb[1]);

        // each KV head's kept rows into cells 0..n_keep-1, through the bit view where there is one
        auto gather = [&](ggml_tensor * t, ggml_tensor * bits, int64_t d, int64_t n_embd) {
            if (bits) {
                d      = ggml_row_size(t->type, d)/sizeof(float);
                n_embd = ggml_row_size(t->type, n_embd)/sizeof(float);
                t      = bits;
            }
            ggml_tensor * kept = ggml_get_rows(ctx, kv_budget_heads_view(ctx, t, d, n_kv, n_hkv, n_embd, strm), sel);
            ggml_tensor * dst  = kv_budget_heads_view(ctx, t, d, kv_size, n_hkv, n_embd, strm);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, dst, kept, inp->dst));
        };
        gather(layer.k, B.k_bits.empty() ? nullptr : B.k_bits[ikv], d_k, hparams.n_embd_k_gqa(il));
        gather(layer.v, B.v_bits.empty() ? nullptr : B.v_bits[ikv], d_v, hparams.n_embd_v_gqa(il));

        if (h2o) {
            // the accumulated scores move with their tokens
            ggml_tensor * a_kept = ggml_get_rows(ctx, ggml_reshape_3d(ctx, layer_acc[ikv], 1, n_kv, n_hkv), sel);
            ggml_tensor * a_dst  = ggml_view_3d(ctx, B.acc[ikv], 1, kv_size, n_hkv,
                    ggml_element_size(B.acc[ikv]), B.acc[ikv]->nb[1], strm*B.acc[ikv]->nb[2]);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, a_dst, a_kept, inp->dst));
        }
    }
}

// an eviction graph, the K-shift pattern: the reserve graph result, the context's scheduler
ggml_cgraph * llama_kv_budget_evict::build_graph(kv_evict_graph kind) {
    auto * sched = lctx->get_sched();
    auto * res   = lctx->get_gf_res_reserve();
    ggml_backend_sched_reset(sched);
    res->reset();

    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();

    // the graph that gathers is the eviction's last: it takes the host data; one before it takes a copy
    const bool order  = kind != KV_EVICT_GRAPH_GATHER;
    const bool gather = kind != KV_EVICT_GRAPH_ORDER;
    auto inp = gather ? std::move(inp_host) : std::make_unique<llm_graph_input_kv_budget>(*inp_host);

    // each graph creates only its own inputs: ggml-cuda keys its CUDA graphs by the first node's address,
    // which then differs between the two graphs of a split eviction (alike, they would never be replayed)
    auto new_input = [&](ggml_tensor *& t, int64_t ne0, int64_t ne1, ggml_type type) {
        t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
        ggml_set_input(t);
    };
    if (order && !streaming) {
        new_input(inp->mask, n_kv, n_mask_rows, GGML_TYPE_F32);
    }
    if (order && (h2o || snapkv)) {
        new_input(inp->evictable, n_kv, 1, GGML_TYPE_F32);
    }
    if (order && !streaming) {
        new_input(inp->row_w, 1, n_rows, GGML_TYPE_F32);
    }
    if (order && h2o) {
        new_input(inp->old, n_kv, 1, GGML_TYPE_F32);
    }
    if (order) {
        new_input(inp->bias, n_kv, 1, GGML_TYPE_F32);
    }
    if (per_head && gather) {
        inp->dst = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_keep);
        ggml_set_input(inp->dst);
    }

    std::vector<ggml_tensor *> layer_acc(kv.layers.size(), nullptr);
    if (order) {
        build_order(ctx, gf, inp.get(), layer_acc);
    }
    if (per_head && gather) {
        build_gather(ctx, gf, inp.get(), layer_acc);
    }

    res->add_input(std::move(inp));

    if (!ggml_backend_sched_alloc_graph(sched, gf)) {
        LLAMA_LOG_ERROR("%s: failed to allocate the eviction graph\n", __func__);
        return nullptr;
    }
    res->set_inputs(nullptr);
    return gf;
}

// wait = false: the graph may still run on the device when this returns
bool llama_kv_budget_evict::compute(ggml_cgraph * gf, bool wait) {
    if (!gf || lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        LLAMA_LOG_ERROR("%s: failed to compute the eviction graph\n", __func__);
        return false;
    }
    if (wait) {
        ggml_backend_sched_synchronize(lctx->get_sched());
    }
    return true;
}

// per head: the kept cells of every (layer, KV head) on the host; split, from the device's B.order_sel
// (into pinned memory where the device has it), else the one graph's full order
void llama_kv_budget_evict::read_order() {
    if (!per_head) {
        return;
    }
    if (!split) {
        B.order_host.resize((size_t) n_kv*row_off.back());
        ggml_backend_tensor_get(order_all, B.order_host.data(), 0, B.order_host.size()*sizeof(int32_t));
        orders_host  = B.order_host.data();
        order_stride = n_kv;
        return;
    }
    int32_t * dst = B.order_pinned ? (int32_t *) ggml_backend_buffer_get_base(B.order_pinned.get()) : nullptr;
    if (!dst) {
        B.order_host.resize(ggml_nelements(B.order_sel));
        dst = B.order_host.data();
    }
    ggml_backend_tensor_get(B.order_sel, dst, 0, ggml_nbytes(B.order_sel));
    orders_host  = dst;
    order_stride = B.order_sel->ne[0];
}

// per token: the cells outside the top C are freed; the kept ones stay where they are
void llama_kv_budget_evict::rewrite_token() {
    std::vector<int32_t> order(n_kv);
    ggml_backend_tensor_get(total_order, order.data(), 0, n_kv*sizeof(int32_t));
    std::vector<bool> keep(n_kv, false);
    for (uint32_t r = 0; r < n_keep; ++r) {
        keep[order[r]] = true;
    }
    for (uint32_t i = 0; i < n_kv; ++i) {
        if (!keep[i] && !cells.is_empty(i)) {
            cells.rm(i);
            S.comp_cell_pos[i] = -1;
        }
        S.acc_valid[i] = keep[i];
    }
    S.n_evicted += n_used - n_keep;
    kv.v_heads[strm] = 0;
}

// per head: cells [0, C) become composite cells; each (layer, KV head) records the original position of
// the token it keeps in each of them, and a cell takes the newest of those as its own position
void llama_kv_budget_evict::rewrite_head() {
    const auto & hparams = kv.hparams;

    // the new per-head positions are written into a scratch table that is then swapped in, so that every head
    // reads the old table; a cell's original position is, per head, its composite position or else its own
    // (cell_pos: -1 empty, -2 composite)
    B.comp_pos_next.resize(S.comp_pos.size());
    std::vector<llama_pos> cell_pos(n_kv);
    for (uint32_t i = 0; i < n_kv; ++i) {
        cell_pos[i] = cells.is_empty(i) ? -1 : S.comp_cell_pos[i] >= 0 ? -2 : cells.pos_get(i);
    }

    // the layers are independent (C x n_head_kv entries each): on large caches they are split over a few of the
    // context's threads (each with its own maximum of the new cell positions, merged below); more threads cost
    // more to start than they save at these sizes
    const size_t n_entries = kv.layers.size()*B.n_head_kv_max*n_keep;
    const int n_workers = n_entries < 65536 ? 1 : (int) std::max<uint32_t>(1, std::min<uint32_t>(
            { lctx->n_threads(), 4u, (uint32_t) kv.layers.size() }));
    std::vector<std::vector<llama_pos>> new_pos_w(n_workers, std::vector<llama_pos>(n_keep, -1));
    std::vector<uint8_t> bad_w(n_workers, 0);
    {
        std::vector<std::thread> workers;
        for (int iw = 1; iw < n_workers; ++iw) {
            workers.emplace_back([&, iw] { rewrite_layers(iw, n_workers, cell_pos, new_pos_w[iw].data(), bad_w[iw]); });
        }
        rewrite_layers(0, n_workers, cell_pos, new_pos_w[0].data(), bad_w[0]);
        for (auto & w : workers) {
            w.join();
        }
    }
    for (int iw = 0; iw < n_workers; ++iw) {
        GGML_ASSERT(!bad_w[iw] && "the eviction selected an empty cell or placed the protected cells apart");
    }
    std::vector<llama_pos> & new_pos = new_pos_w[0];
    for (int iw = 1; iw < n_workers; ++iw) {
        for (uint32_t r = 0; r < n_keep; ++r) {
            new_pos[r] = std::max(new_pos[r], new_pos_w[iw][r]);
        }
    }
    for (const auto & layer : kv.layers) {
        S.n_evicted += (uint64_t) (n_used - n_keep)*hparams.n_head_kv(layer.il);
    }

    // every cell below n_kv is rewritten and none above is used: start from empty cells
    const uint32_t n_prot = prot.size();
    cells.reset();
    std::fill(S.comp_cell_pos.begin(), S.comp_cell_pos.end(), -1);
    for (uint32_t r = 0; r < n_keep; ++r) {
        cells.pos_set(r, new_pos[r]);
        cells.seq_add(r, seq);
        if (r >= n_prot) {
            S.comp_cell_pos[r] = new_pos[r];
        }
    }
    S.comp_pos.swap(B.comp_pos_next);
    std::fill(S.acc_valid.begin(), S.acc_valid.end(), 0);
    std::fill(S.acc_valid.begin(), S.acc_valid.begin() + n_keep, 1);
    kv.v_heads[strm] = n_keep;
}

// the layers iw, iw + n_workers, ... of rewrite_head: their rows of the new position table; new_pos: the
// newest original position per new cell; bad: an empty cell was selected or the protected cells moved
void llama_kv_budget_evict::rewrite_layers(int iw, int n_workers, const std::vector<llama_pos> & cell_pos,
        llama_pos * new_pos, uint8_t & bad) {
    const size_t   n_hkv_max = B.n_head_kv_max;
    const uint32_t kv_size   = kv.get_size();
    const uint32_t n_prot    = prot.size();

    for (size_t ikv = iw; ikv < kv.layers.size(); ikv += n_workers) {
        const uint32_t n_hkv = kv.hparams.n_head_kv(kv.layers[ikv].il);
        const int32_t * order = orders_host + row_off[ikv]*order_stride;

        for (uint32_t h = 0; h < n_hkv_max; ++h) {
            llama_pos * comp_new = B.comp_pos_next.data() + ((size_t) ikv*n_hkv_max + h)*kv_size;
            if (h >= n_hkv) {
                std::fill(comp_new, comp_new + kv_size, -1);
                continue;
            }
            const int32_t   * sel      = order + (size_t) h*order_stride;
            const llama_pos * comp_old = S.comp_pos.data() + ((size_t) ikv*n_hkv_max + h)*kv_size;
            for (uint32_t r = 0; r < n_prot; ++r) {
                // every head places the protected cells identically (ordered by their bias)
                bad |= sel[r] != (int32_t) prot[n_prot - 1 - r].second;
            }
            llama_pos orig_min = 0;
            for (uint32_t r = 0; r < n_keep; ++r) {
                const uint32_t  j    = sel[r];
                const llama_pos cp   = cell_pos[j];
                const llama_pos orig = cp == -2 ? comp_old[j] : cp;
                orig_min    = std::min(orig_min, orig);
                comp_new[r] = orig;
                new_pos[r]  = std::max(new_pos[r], orig);
            }
            bad |= orig_min < 0; // an empty cell was selected
            std::fill(comp_new + n_keep, comp_new + kv_size, -1);
        }
    }
}

// one line per eviction at debug level (-v): the sequence's eviction count, the total, then the stages (split:
// the gather overlaps the metadata rewrite, and "wait" is what is left of it; one graph: "gather" holds the
// whole graph), the wait for the previous ubatch's graph before it (not part of the total) and the sequence
void llama_kv_budget_evict::log_done() const {
    const int64_t t_total_us = ggml_time_us() - t_start_us;
    LLAMA_LOG_DEBUG("%s: eviction %u: %u -> %u cells (%zu protected), pos_max = %d, %.3f ms (inputs %.3f, order %.3f, "
            "read-back %.3f, gather %.3f, metadata %.3f, wait %.3f ms; %zu layers, %s; previous graph %.3f ms; seq %d)\n", "budget_evict",
            S.n_evictions, n_used, cells.get_used(), prot.size(), pos_max, t_total_us/1000.0,
            t_inputs_us/1000.0, t_order_us/1000.0, t_read_us/1000.0, t_gather_us/1000.0, t_meta_us/1000.0,
            t_wait_us/1000.0, kv.layers.size(), split ? "two graphs" : "one graph", t_prev_us/1000.0, seq);
}

bool llama_kv_cache::budget_evict(llama_context * lctx, const std::vector<uint32_t> & strms) {
    GGML_ASSERT(budget);
    for (uint32_t s : strms) {
        if (v_cells[s].get_used() <= kv_budget_n_keep(*budget, s)) {
            continue;
        }
        llama_kv_budget_evict ev(*this, lctx, s);
        if (!ev.run()) {
            return false;
        }
    }
    return true;
}

//
// position edits and session state
//

bool llama_kv_cache::budget_seq_rm_ok(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    GGML_ASSERT(budget);
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max(); // as seq_rm reads it: to the end (p0 < 0 reads as 0 below)
    }

    // nothing evicted yet, everything removed, or only tokens decoded after the last eviction (ordinary
    // cells: composite cells are placed at the newest position they hold, which is older than them)
    if (p0 <= 0 && p1 == std::numeric_limits<llama_pos>::max()) {
        return true;
    }
    for (uint32_t s = 0; s < n_stream; ++s) {
        const llama_pos last = budget->streams[s].last_evict_pos_max;
        if ((seq_id >= 0 && seq_to_stream[seq_id] != s) || last < 0 || p0 > last) {
            continue;
        }
        LLAMA_LOG_DEBUG("%s: cannot remove positions [%d, %d) of sequence %d from a budgeted cache: an eviction at position %d "
                "dropped or regrouped older tokens (removable: positions > %d, or all)\n", __func__, p0, p1,
                kv_budget_stream_seq(s), last, last);
        return false;
    }
    return true;
}

void llama_kv_cache::budget_reset_empty() {
    GGML_ASSERT(budget);
    for (uint32_t s = 0; s < n_stream; ++s) {
        if (v_cells[s].get_used() == 0) {
            budget->streams[s].reset();
        }
    }
}

void llama_kv_cache::budget_on_new_token(uint32_t s, uint32_t idx, llama_pos pos) {
    auto & B = *budget;
    auto & S = B.streams[s];
    S.comp_cell_pos[idx] = -1;
    S.acc_valid[idx]     = 0;
    if (B.params.keep == 0) {
        return;
    }
    const bool prompt = s < B.n_batch_seq_tokens.size() && B.n_batch_seq_tokens[s] > 1;
    if (S.keep.add(pos, prompt, B.params.keep)) {
        LLAMA_LOG_WARN("%s: the prompt of sequence %d reaches kv_keep = %u kept tokens (first prompt and latest turn): "
                "its tokens from position %d on are not kept and are evicted like the answer's; raise kv_keep to keep them\n",
                __func__, kv_budget_stream_seq(s), B.params.keep, pos);
    }
}

void llama_kv_cache::budget_copy_stream(uint32_t ssrc, uint32_t sdst) {
    GGML_ASSERT(budget);
    budget->streams[sdst] = budget->streams[ssrc];
}

// the copy's device part (query windows, H2O's scores), with the K/V buffers in the update step
void llama_kv_cache::budget_copy_stream_data(uint32_t ssrc, uint32_t sdst) const {
    GGML_ASSERT(budget);
    std::vector<uint8_t> buf;
    auto copy = [&](ggml_tensor * t, size_t stream_bytes) {
        buf.resize(stream_bytes);
        ggml_backend_tensor_get(t, buf.data(), ssrc*stream_bytes, stream_bytes);
        ggml_backend_tensor_set(t, buf.data(), sdst*stream_bytes, stream_bytes);
    };
    for (ggml_tensor * q : budget->q_win) {
        copy(q, ggml_nbytes(q)/n_stream);
    }
    for (ggml_tensor * a : budget->acc) {
        copy(a, a->nb[2]);
    }
}

static constexpr uint32_t KV_BUDGET_STATE_MAGIC   = 0x424b564d; // "MVKB"
static constexpr uint32_t KV_BUDGET_STATE_VERSION = 3;         // 2: the budget's data follows each stream's cells; 3: kv_keep's ranges

void llama_kv_cache::budget_state_write_header(llama_io_write_i & io) const {
    const auto & B = *budget;
    const uint32_t hdr[6] = {
        KV_BUDGET_STATE_MAGIC, KV_BUDGET_STATE_VERSION, B.params.window,
        (uint32_t) B.q_win.size(), B.params.n_q_rows(), B.n_head_kv_max,
    };
    io.write(hdr, sizeof(hdr));
}

void llama_kv_cache::budget_state_read_header(llama_io_read_i & io) {
    const auto & B = *budget;
    uint32_t hdr[6] = {};
    io.read(hdr, sizeof(hdr));
    if (hdr[0] != KV_BUDGET_STATE_MAGIC) {
        throw std::runtime_error("kv_budget: this state was saved by a context without a KV budget; "
                "load it into a context without kv_budget");
    }
    if (hdr[1] != KV_BUDGET_STATE_VERSION && hdr[1] != 2) {
        throw std::runtime_error(format("kv_budget: state format %u, this build reads formats 2 and %u", hdr[1], KV_BUDGET_STATE_VERSION));
    }
    budget->state_version = hdr[1];
    const uint32_t rows = B.params.n_q_rows();
    if (hdr[2] != B.params.window || hdr[3] != B.q_win.size() || hdr[4] != rows || hdr[5] != B.n_head_kv_max) {
        throw std::runtime_error(format("kv_budget: the state was saved with kv_window %u, %u layers, %u query rows, %u KV heads; "
                "this context has kv_window %u, %zu layers, %u query rows, %u KV heads", hdr[2], hdr[3], hdr[4], hdr[5],
                B.params.window, B.q_win.size(), rows, B.n_head_kv_max));
    }
}

// after the cells of stream s that state_write saved (in its order): the sequence's budget state
void llama_kv_cache::budget_state_write_extra(llama_io_write_i & io, uint32_t s, llama_seq_id seq_id) const {
    const auto & B = *budget;
    const auto & S = B.streams[s];
    const auto & cells = v_cells[s];
    const size_t kv_size = get_size();
    const uint32_t n_rows = B.params.n_q_rows();

    std::vector<uint32_t> idxs;
    for (uint32_t i = 0; i < cells.size(); ++i) {
        if (!cells.is_empty(i) && (seq_id == -1 || cells.seq_has(i, seq_id))) {
            idxs.push_back(i);
        }
    }
    const uint32_t n = idxs.size();

    io.write(&S.n_evictions,        sizeof(S.n_evictions));
    io.write(&S.n_evicted,          sizeof(S.n_evicted));
    io.write(&S.last_evict_pos_max, sizeof(S.last_evict_pos_max));
    io.write(&n,                    sizeof(n));

    std::vector<llama_pos> buf(n);
    for (uint32_t k = 0; k < n; ++k) {
        buf[k] = S.comp_cell_pos[idxs[k]];
    }
    io.write(buf.data(), n*sizeof(llama_pos));
    for (size_t lh = 0; lh < B.q_win.size()*B.n_head_kv_max; ++lh) {
        for (uint32_t k = 0; k < n; ++k) {
            buf[k] = S.comp_pos[lh*kv_size + idxs[k]];
        }
        io.write(buf.data(), n*sizeof(llama_pos));
    }

    for (ggml_tensor * q : B.q_win) {
        io.write_tensor(q, (size_t) s*n_rows*q->nb[1], (size_t) n_rows*q->nb[1]);
    }
    io.write(S.q_pos.data(), n_rows*sizeof(llama_pos));

    // H2O's accumulated scores, per saved cell
    const uint8_t compressed = S.compressed;
    io.write(&compressed, sizeof(compressed));
    std::vector<uint8_t> valid(n);
    for (uint32_t k = 0; k < n; ++k) {
        valid[k] = S.acc_valid[idxs[k]];
    }
    io.write(valid.data(), n);
    const llama_pos keep[4] = { S.keep.first_p0, S.keep.first_p1, S.keep.last_p0, S.keep.last_p1 };
    const uint8_t keep_flags = (S.keep.first_done ? 1 : 0) | (S.keep.answered ? 2 : 0) | (S.keep.overflow ? 4 : 0);
    io.write(keep, sizeof(keep));
    io.write(&keep_flags, sizeof(keep_flags));
    std::vector<float> acc_all, acc_saved(n);
    for (ggml_tensor * a : B.acc) {
        acc_all.resize(a->ne[0]*a->ne[1]);
        ggml_backend_tensor_get(a, acc_all.data(), s*a->nb[2], a->nb[2]);
        for (int64_t h = 0; h < a->ne[1]; ++h) {
            for (uint32_t k = 0; k < n; ++k) {
                acc_saved[k] = acc_all[h*kv_size + idxs[k]];
            }
            io.write(acc_saved.data(), n*sizeof(float));
        }
    }
}

void llama_kv_cache::budget_state_read_extra(llama_io_read_i & io, uint32_t s, const slot_info & sinfo) {
    auto & B = *budget;
    auto & S = B.streams[s];
    const size_t kv_size = get_size();
    const uint32_t n_rows = B.params.n_q_rows();

    uint32_t n = 0;
    io.read(&S.n_evictions,        sizeof(S.n_evictions));
    io.read(&S.n_evicted,          sizeof(S.n_evicted));
    io.read(&S.last_evict_pos_max, sizeof(S.last_evict_pos_max));
    io.read(&n,                    sizeof(n));

    const uint32_t n_placed = sinfo.idxs.empty() ? 0 : sinfo.idxs[0].size();
    if (n != n_placed) {
        throw std::runtime_error(format("kv_budget: the state describes %u cells, %u were restored", n, n_placed));
    }
    const auto & idxs = sinfo.idxs[0];

    std::vector<llama_pos> buf(n);
    io.read(buf.data(), n*sizeof(llama_pos));
    for (uint32_t k = 0; k < n; ++k) {
        S.comp_cell_pos[idxs[k]] = buf[k];
    }
    for (size_t lh = 0; lh < B.q_win.size()*B.n_head_kv_max; ++lh) {
        io.read(buf.data(), n*sizeof(llama_pos));
        for (uint32_t k = 0; k < n; ++k) {
            S.comp_pos[lh*kv_size + idxs[k]] = buf[k];
        }
    }

    for (ggml_tensor * q : B.q_win) {
        io.read_tensor(q, (size_t) s*n_rows*q->nb[1], (size_t) n_rows*q->nb[1]);
    }
    io.read(S.q_pos.data(), n_rows*sizeof(llama_pos));

    uint8_t compressed = 0;
    io.read(&compressed, sizeof(compressed));
    S.compressed = compressed;
    std::vector<uint8_t> valid(n);
    io.read(valid.data(), n);
    for (uint32_t k = 0; k < n; ++k) {
        S.acc_valid[idxs[k]] = valid[k];
    }
    S.keep = {};
    if (B.state_version >= 3) {
        llama_pos keep[4];
        uint8_t   keep_flags = 0;
        io.read(keep, sizeof(keep));
        io.read(&keep_flags, sizeof(keep_flags));
        S.keep.first_p0 = keep[0];
        S.keep.first_p1 = keep[1];
        S.keep.last_p0  = keep[2];
        S.keep.last_p1  = keep[3];
        S.keep.first_done = keep_flags & 1;
        S.keep.answered   = keep_flags & 2;
        S.keep.overflow   = keep_flags & 4;
        if (keep[0] > keep[1] || keep[2] > keep[3] || S.keep.n_kept() > B.params.keep) {
            throw std::runtime_error(format("kv_budget: the state keeps %u prompt positions ([%d, %d) and [%d, %d)); this context "
                    "keeps at most kv_keep = %u", S.keep.n_kept(), keep[0], keep[1], keep[2], keep[3], B.params.keep));
        }
    }
    std::vector<float> acc_all, acc_saved(n);
    for (ggml_tensor * a : B.acc) {
        acc_all.assign(a->ne[0]*a->ne[1], 0.0f);
        for (int64_t h = 0; h < a->ne[1]; ++h) {
            io.read(acc_saved.data(), n*sizeof(float));
            for (uint32_t k = 0; k < n; ++k) {
                acc_all[h*kv_size + idxs[k]] = acc_saved[k];
            }
        }
        ggml_backend_tensor_set(a, acc_all.data(), s*a->nb[2], a->nb[2]);
    }
}

//
// public API
//

static llama_kv_cache * kv_budget_cache(const llama_context * ctx) {
    if (!ctx) {
        return nullptr;
    }
    return llama_kv_budget_cache_of(llama_get_memory(ctx));
}

bool llama_kv_budget_supported(const llama_model * model, char * why, size_t why_size) {
    if (!model) {
        return false;
    }
    try {
        llama_kv_budget_check_model(*model);
    } catch (const std::exception & e) {
        if (why && why_size > 0) {
            snprintf(why, why_size, "%s", e.what());
        }
        return false;
    }
    return true;
}

// the totals of the streams in [s0, s1)
// the sliding-window cache of an iSWA model (its KV bytes count with the budgeted cache's), nullptr otherwise
static const llama_kv_cache * kv_budget_swa_cache(const llama_context * ctx) {
    const auto * iswa = ctx ? dynamic_cast<const llama_kv_cache_iswa *>(llama_get_memory(ctx)) : nullptr;
    return iswa ? iswa->get_swa() : nullptr;
}

static void kv_budget_fill_info(const llama_kv_cache & kv, const llama_kv_cache * swa, uint32_t s0, uint32_t s1,
        llama_kv_budget_info * info) {
    const auto * B = kv.budget_state();

    uint32_t n_head_kv = 0;
    for (uint32_t ikv = 0; ikv < kv.budget_n_layers(); ++ikv) {
        n_head_kv = std::max(n_head_kv, kv.budget_n_head_kv(ikv));
    }

    *info = {};
    info->n_layer   = kv.budget_n_layers();
    info->n_head_kv = n_head_kv;
    info->n_seq     = s1 - s0;
    info->active    = B != nullptr;
    info->pos_last_evict    = -1;
    info->kv_evict_interval = B ? B->params.interval : 0;
    if (B) {
        const auto & p = B->params;
        info->kv_budget       = p.budget;
        info->kv_window       = p.window;
        info->kv_sinks        = p.sinks;
        info->kv_keep         = p.keep;
        info->kv_recent       = p.n_recent();
        info->kv_fusion       = p.fusion;
        info->kv_group_reduce = p.group_reduce;
        info->kv_granularity  = p.granularity;
        info->kv_policy       = p.policy;
    }
    for (uint32_t s = s0; s < s1; ++s) {
        info->n_cells += kv.get_size();
        info->n_used  += kv.get_cells(s).get_used();
        if (B) {
            const auto & S = B->streams[s];
            info->n_evictions += S.n_evictions;
            info->n_evicted   += S.n_evicted;
            info->t_evict_ms  += S.t_evict_us/1000.0;
            info->pos_last_evict = std::max(info->pos_last_evict, S.last_evict_pos_max);
            info->n_kept += S.keep.n_kept();
        }
    }
    // the buffers are shared by the streams: a sequence's share
    const uint32_t n_stream = kv.get_n_stream();
    info->kv_bytes  = (kv.budget_kv_bytes() + (swa ? swa->budget_kv_bytes() : 0))/n_stream*(s1 - s0);
    info->aux_bytes = B ? B->aux_bytes()/n_stream*(s1 - s0) : 0;
}

bool llama_kv_budget_get_info(const llama_context * ctx, llama_kv_budget_info * info) {
    const auto * kv = kv_budget_cache(ctx);
    if (!kv || !info) {
        return false;
    }
    kv_budget_fill_info(*kv, kv_budget_swa_cache(ctx), 0, kv->get_n_stream(), info);
    return true;
}

bool llama_kv_budget_get_seq_info(const llama_context * ctx, llama_seq_id seq_id, llama_kv_budget_info * info) {
    const auto * kv = kv_budget_cache(ctx);
    if (!kv || !info || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_stream()) {
        return false;
    }
    kv_budget_fill_info(*kv, kv_budget_swa_cache(ctx), seq_id, seq_id + 1, info);
    return true;
}

int32_t llama_kv_budget_get_seq_positions(const llama_context * ctx, llama_seq_id seq_id, int32_t il, llama_pos * out, int32_t n_out) {
    const auto * kv = kv_budget_cache(ctx);
    if (!kv || !out || il < 0 || (uint32_t) il >= kv->budget_n_layers() || seq_id < 0 || (uint32_t) seq_id >= kv->get_n_stream()) {
        return -1;
    }
    const uint32_t n_cells = kv->get_size();
    const uint32_t n_hkv   = kv->budget_n_head_kv(il);
    const int64_t  n_need  = (int64_t) n_cells*n_hkv;
    if (n_out < n_need) {
        return -1;
    }
    for (uint32_t h = 0; h < n_hkv; ++h) {
        for (uint32_t i = 0; i < n_cells; ++i) {
            out[(size_t) h*n_cells + i] = kv->budget_orig_pos(seq_id, il, h, i);
        }
    }
    return (int32_t) n_need;
}

int32_t llama_kv_budget_get_positions(const llama_context * ctx, int32_t il, llama_pos * out, int32_t n_out) {
    return llama_kv_budget_get_seq_positions(ctx, 0, il, out, n_out);
}

int64_t llama_kv_cache::budget_read_queries(uint32_t ikv, float * out, int64_t n_out) const {
    if (!budget || ikv >= layers.size()) {
        return -1;
    }
    // sequence 0's rows
    const ggml_tensor * q = budget->q_win[ikv];
    const int64_t n = ggml_nelements(q)/n_stream;
    if (n_out < n) {
        return -1;
    }
    ggml_backend_tensor_get(q, out, 0, n*sizeof(float));
    return n;
}

int64_t llama_kv_cache::budget_read_keys(uint32_t ikv, float * out, int64_t n_out) const {
    if (!budget || ikv >= layers.size()) {
        return -1;
    }
    const ggml_tensor * k = layers[ikv].k;
    const int64_t n_row = k->ne[0];
    const int64_t n = n_row*get_size();
    if (n_out < n) {
        return -1;
    }
    std::vector<uint8_t> raw(ggml_row_size(k->type, n_row)*get_size());
    ggml_backend_tensor_get(k, raw.data(), 0, raw.size());
    const auto * traits = ggml_get_type_traits(k->type);
    if (k->type == GGML_TYPE_F32) {
        memcpy(out, raw.data(), n*sizeof(float));
    } else if (traits->to_float) {
        traits->to_float(raw.data(), out, n);
    } else {
        return -1;
    }
    return n;
}

int32_t llama_kv_budget_get_queries(const llama_context * ctx, int32_t il, float * out, int32_t n_out) {
    const auto * kv = kv_budget_cache(ctx);
    return kv && out && il >= 0 ? (int32_t) kv->budget_read_queries(il, out, n_out) : -1;
}

int32_t llama_kv_budget_get_keys(const llama_context * ctx, int32_t il, float * out, int32_t n_out) {
    const auto * kv = kv_budget_cache(ctx);
    return kv && out && il >= 0 ? (int32_t) kv->budget_read_keys(il, out, n_out) : -1;
}

int32_t llama_kv_budget_get_cells(const llama_context * ctx, llama_pos * pos, int8_t * composite, int32_t n_out) {
    const auto * kv = kv_budget_cache(ctx);
    if (!kv || !pos || !composite || !kv->budget_state() || n_out < (int32_t) kv->get_size()) {
        return -1;
    }
    const auto & cells = kv->get_cells(0);
    const auto * B = kv->budget_state();
    for (uint32_t i = 0; i < kv->get_size(); ++i) {
        pos[i]       = cells.is_empty(i) ? -1 : cells.pos_get(i);
        composite[i] = !cells.is_empty(i) && B->streams[0].comp_cell_pos[i] >= 0;
    }
    return (int32_t) kv->get_size();
}

int32_t llama_kv_budget_get_scores(const llama_context * ctx, int32_t il, float * out, int32_t n_out) {
    const auto * kv = kv_budget_cache(ctx);
    const auto * B  = kv ? kv->budget_state() : nullptr;
    if (!B || !out || il < 0 || (size_t) il >= B->acc.size()) {
        return -1;
    }
    const ggml_tensor * a = B->acc[il];
    const int64_t n = a->ne[0]*a->ne[1]; // sequence 0's scores
    if (n_out < n) {
        return -1;
    }
    ggml_backend_tensor_get(a, out, 0, a->nb[2]);
    const int64_t n_cells = a->ne[0];
    for (int64_t j = 0; j < n; ++j) {
        if (!B->streams[0].acc_valid[j % n_cells]) {
            out[j] = 0.0f;
        }
    }
    return (int32_t) n;
}
