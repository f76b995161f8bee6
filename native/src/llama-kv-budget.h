#pragma once

// morphkv-gguf: a constant-size KV cache with MorphKV eviction
//
// With cparams.kv_budget = C > 0 the plain llama_kv_cache is allocated for C + max(S, n_ubatch) cells
// (padded to 256) per sequence instead of n_ctx: each sequence has its own stream of the non-unified cache
// and its own budget (an iSWA model: its full-attention layers; the sliding-window layers keep their cache). Once C + S of a sequence's cells are in use (or a ubatch finds no free slot), an
// eviction graph runs for that sequence in the cache's update step or between two ubatches of a batch: the last W post-RoPE queries of every layer (kept in
// a ring buffer written by build_attn) score the older cells, softmax over the evictable cells, fused
// over the window rows and over the query heads of each KV head; then
//   - granularity "head":  every KV head of every layer keeps its own top (C - protected) cells; their
//                          K/V rows are gathered into "composite" cells [0, C) (KVCompose layout), the
//                          protected cells (recent window + sinks) land on the same cells in every head
//   - granularity "token": one score per cell (summed over heads and layers); other cells are freed
// All ops are ggml ops with CPU and CUDA kernels; nothing leaves the device except the selected indices.

#include "llama.h"

#include "ggml-cpp.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct llama_cparams;
class  llama_model;

struct llama_kv_budget_params {
    uint32_t budget   = 0;   // C: cells kept after an eviction (0 = off)
    uint32_t window   = 32;  // W: most recent tokens, never evicted; their queries score the rest
    uint32_t interval = 64;  // S: tokens that may accumulate beyond C before the next eviction
    uint32_t sinks    = 0;   // first tokens, never evicted
    uint32_t keep     = 0;   // K: the user's prompt tokens kept besides the C cells (llama_kv_budget_keep)
    uint32_t recent   = 0;   // R: most recent tokens never evicted when more than W (only W of them score)

    llama_kv_fusion      fusion       = LLAMA_KV_FUSION_SUM;
    llama_kv_fusion      group_reduce = LLAMA_KV_FUSION_SUM;
    llama_kv_granularity granularity  = LLAMA_KV_GRANULARITY_HEAD;
    llama_kv_policy      policy       = LLAMA_KV_POLICY_MORPHKV;

    uint32_t n_cells = 0;    // physical cells of the cache (0: n_ctx, for SnapKV, whose cache grows)

    bool enabled() const { return budget > 0; }

    // the most recent tokens an eviction protects: the scoring window, or more (kv_recent)
    uint32_t n_recent() const { return std::max(window, recent); }

    // an eviction is due with n_used cells in use: C + S of them, besides the n_kept prompt cells kept
    bool full(uint32_t n_used, uint32_t n_kept) const { return n_used >= budget + n_kept + interval; }

    // evictions run between the ubatches of a batch (a prompt of any length fits the cache); SnapKV compresses
    // once, after the prompt, in a cache of n_ctx cells
    bool evicts_between_ubatches() const { return enabled() && policy != LLAMA_KV_POLICY_SNAPKV; }

    // rows of the query ring: the window, or for H2O every query since the last eviction
    uint32_t n_q_rows() const { return policy == LLAMA_KV_POLICY_H2O ? std::max(window, interval) : window; }
};

// with a budget: refuses a model it cannot cover (llama_kv_budget_check_model), validates the user's parameters,
// fills cparams' budget fields and adjusts the ones a budget needs (flash attention on); throws std::runtime_error
// naming what is wrong
void llama_kv_budget_configure(const llama_model & model, const llama_context_params & params, llama_cparams & cparams);

// throws std::runtime_error if a budget cannot cover the model's memory (supported: the plain KV cache, and the
// full-attention layers of an iSWA cache)
void llama_kv_budget_check_model(const llama_model & model);

// what a budget supports, for refusals: "supported: ..."
const char * llama_kv_budget_accepted();

// the cache a budget lives in: the plain KV cache, or the full-attention (base) cache of an iSWA cache; nullptr otherwise
class llama_kv_cache;
struct llama_memory_i;
llama_kv_cache * llama_kv_budget_cache_of(llama_memory_i * mem);

// the batch being decoded: its size (SnapKV compresses before the first single-token batch) and its tokens per
// sequence (kv_keep: a sequence's prompt tokens come several in a batch)
struct llama_batch_ext;
void llama_kv_budget_note_batch(llama_context * lctx, const llama_batch_ext & batch);

// kv_keep: the prompt tokens of a sequence that are never evicted, kept besides its budget. A prompt token is one
// that arrives in a batch holding more than one token of its sequence (a generated token comes alone). Kept: the
// first prompt since the sequence was empty (system prompt and first user turn) and the latest prompt (the latest
// user turn); a new prompt after an answer releases the previous latest one, whose tokens are then scored like the
// answer's. At most K positions are kept: past them, prompt tokens are not kept (logged once per prompt).
struct llama_kv_budget_keep {
    llama_pos first_p0 = 0, first_p1 = 0; // [p0, p1): the first prompt
    llama_pos last_p0  = 0, last_p1  = 0; // the latest prompt, after an answer
    bool first_done = false; // an answer followed the first prompt
    bool answered   = false; // a token came alone since the latest prompt token
    bool overflow   = false; // the current prompt outgrew K (logged)

    uint32_t n_kept() const { return (uint32_t) ((first_p1 - first_p0) + (last_p1 - last_p0)); }
    bool kept(llama_pos pos) const { return (pos >= first_p0 && pos < first_p1) || (pos >= last_p0 && pos < last_p1); }

    // a token of the sequence at pos; prompt: its batch held other tokens of the sequence; returns true the first
    // time a prompt outgrows cap
    bool add(llama_pos pos, bool prompt, uint32_t cap);
};

// per-sequence state of the budget: one per stream of the cache (a non-unified cache holds sequence s in
// stream s; a budget with one stream holds sequence 0)
struct llama_kv_budget_stream {
    // original position held by composite cell i of (layer, KV head): comp_pos[(il*n_head_kv_max + h)*n_cells + i]
    // valid for cells marked in comp_cell_pos (the pos the cell was given when it became composite)
    std::vector<llama_pos> comp_pos;
    std::vector<llama_pos> comp_cell_pos; // -1: ordinary cell

    // H2O: cells whose accumulated scores are valid (those kept by the last eviction)
    std::vector<uint8_t> acc_valid;

    // the position whose query each row of the stream's query window holds (-1: none); a row holding a position
    // the cache no longer has (a rejected draft token, removed by seq_rm) does not score the next eviction
    std::vector<llama_pos> q_pos;

    llama_kv_budget_keep keep;         // kv_keep: the prompt positions never evicted

    llama_pos last_evict_pos_max = -1; // newest position at the last eviction since the sequence was empty
    bool      compressed = false;      // SnapKV: the prompt was compressed

    uint32_t n_evictions = 0;
    uint64_t n_evicted   = 0;  // cells freed by evictions (token granularity) or dropped per head (head)
    double   t_evict_us  = 0.0;

    // forget the evictions' bookkeeping and the query window (the sequence is empty)
    void reset();
};

// per-cache state of the budget (owned by llama_kv_cache)
struct llama_kv_budget_state {
    llama_kv_budget_params params;

    uint32_t n_stream = 1;

    // ring buffers of the last W post-RoPE queries, per KV-cache layer: F32 [n_embd_head_k*n_head, W*n_stream]
    // (stream s owns rows [s*W, (s + 1)*W))
    std::vector<ggml_tensor *> q_win;

    // per KV-cache layer: the scale of q.k in the model's attention (build_attn's kq_scale: 1/sqrt(d_k) for most
    // models, f_attention_scale for Granite, 1 where Q is scaled before, ...)
    std::vector<float> kq_scale;

    // attention logit soft-capping of the model's attention (Gemma 2: 50; 0: none), applied to the scaled q.k
    float softcap = 0.0f;

    // per layer: score with the fused ggml_kv_scores op (the K buffer's device supports it) instead of the
    // composed graph (mul_mat + soft_max_ext + reductions)
    std::vector<uint8_t> scores_fused;
    bool scores_fused_all = false;

    // H2O: attention accumulated per (layer, cell, KV head, stream): F32 [n_cells, n_head_kv, n_stream] per layer,
    // valid for the cells marked in the stream's acc_valid
    std::vector<ggml_tensor *> acc;

    // per KV-cache layer: F32 tensors over the same bytes as the layer's K and V, through which the eviction's
    // gather copies rows bit for bit (null where a head's row is not a whole number of 4-byte words, or K/V is
    // F32 already: the gather then goes through get_rows' F32 rows)
    std::vector<ggml_tensor *> k_bits;
    std::vector<ggml_tensor *> v_bits;
    ggml_context_ptr           bits_ctx;

    uint32_t state_version = 0;  // the format of the state being read (budget_state_read_header)

    int32_t n_batch_tokens = 0;  // tokens of the batch being decoded
    std::vector<uint32_t> n_batch_seq_tokens; // per stream: tokens of its sequence in the batch being decoded
    llama_context * lctx   = nullptr; // the context of the cache's updates: runs the evictions between ubatches
    bool    warned_train_ctx = false;
    std::vector<std::pair<ggml_context_ptr, ggml_backend_buffer_ptr>> ctxs_bufs;

    uint32_t n_head_kv_max = 0;
    std::vector<llama_kv_budget_stream> streams;

    std::vector<llama_pos> comp_pos_next; // scratch of the eviction (the table being written)
    std::vector<int32_t>   order_host;    // scratch of the eviction (every layer's selected cells, read back)

    // head granularity (not H2O): every (layer, KV head)'s kept cells, I32 [C, sum of n_head_kv], written by
    // the eviction's first graph (scores + argsort) and read by its second (the gather), which the device
    // runs while the host rewrites the cell metadata from the copy read back into order_pinned (pinned host
    // memory where the device has it, else order_host); one eviction runs at a time, whichever the stream
    ggml_tensor *           order_sel = nullptr;
    ggml_backend_buffer_ptr order_pinned;

    size_t aux_bytes() const;
};
