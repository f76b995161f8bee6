// morphkv-gguf: every architecture llama.cpp knows, with a KV budget (beside test-llama-archs, whose fixtures it
// uses: the same tiny random models). For each one, a context with a budget is either
//   budget:  created; below the budget its logits equal the full cache's (flash attention, as the budget uses),
//            and 4x the budget decodes with the cache's cells constant, evictions done and finite logits; or
//   refused: not created, with an error that names the architecture and what is supported.
// Anything else (a crash, a refusal without a message, different logits, growing memory) fails the test.
// Prints one row per architecture: arch, config, verdict, detail (tab separated, or a markdown table with --md).
// -b DEVICE runs the models (and their caches) on that device, e.g. CUDA0.

#define main test_llama_archs_main
#include "test-llama-archs.cpp"
#undef main

#include <algorithm>
#include <map>

namespace {

constexpr uint32_t kv_budget   = 64;
constexpr uint32_t kv_window   = 8;
constexpr uint32_t kv_interval = 16;
constexpr uint32_t n_vocab     = 128; // get_gguf_ctx's vocabulary

struct arch_result {
    std::string arch;
    std::string config;
    std::string verdict; // budget, refused, FAIL
    std::string detail;
};

// the errors logged while a context is created: a refusal must say why
struct log_capture {
    std::string errors;
    int verbosity = 0;
};

void log_cb(ggml_log_level level, const char * text, void * user_data) {
    auto * lc = (log_capture *) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        lc->errors += text;
    }
    if (lc->verbosity > 0) {
        fputs(text, stderr);
    }
}

llama_context_ptr make_ctx(llama_model * model, bool budget) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx           = 1024;
    cp.n_batch         = 64;
    cp.n_ubatch        = 64;
    cp.n_threads       = 2;
    cp.n_threads_batch = 2;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED; // what a budget runs with
    if (budget) {
        cp.kv_budget         = kv_budget;
        cp.kv_window         = kv_window;
        cp.kv_evict_interval = kv_interval;
    }
    return llama_context_ptr(llama_init_from_model(model, cp));
}

// decodes tokens [i0, i1) at their positions in batches of n_batch; the logits of every token (empty on failure)
std::vector<float> decode(llama_context * ctx, const std::vector<llama_token> & tokens, uint32_t i0, uint32_t i1,
        uint32_t n_batch, std::vector<uint32_t> * n_cells = nullptr) {
    std::vector<float> out;
    for (uint32_t b0 = i0; b0 < i1; b0 += n_batch) {
        const uint32_t b1 = std::min(i1, b0 + n_batch);
        llama_batch batch = llama_batch_init(b1 - b0, 0, 1);
        for (uint32_t i = b0; i < b1; ++i) {
            const uint32_t j = i - b0;
            batch.token[j]     = tokens[i];
            batch.pos[j]       = (llama_pos) i;
            batch.n_seq_id[j]  = 1;
            batch.seq_id[j][0] = 0;
            batch.logits[j]    = true;
        }
        batch.n_tokens = (int32_t) (b1 - b0);
        const int32_t ret = llama_decode(ctx, batch);
        llama_batch_free(batch);
        if (ret != 0) {
            return {};
        }
        for (uint32_t i = 0; i < b1 - b0; ++i) {
            const float * l = llama_get_logits_ith(ctx, i);
            out.insert(out.end(), l, l + n_vocab);
        }
        if (n_cells) {
            llama_kv_budget_info info;
            llama_kv_budget_get_info(ctx, &info);
            n_cells->push_back(info.n_cells);
        }
    }
    return out;
}

bool all_finite(const std::vector<float> & v) {
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

std::string first_line(const std::string & s) {
    std::string line = s.substr(0, s.find('\n'));
    const size_t p = line.find("kv_budget");
    return p == std::string::npos ? line : line.substr(p);
}

arch_result check_budgeted(llama_model * model, llama_context * ctx, const std::vector<llama_token> & tokens) {
    arch_result r;
    r.verdict = "FAIL";

    // below the budget: the same logits as the full cache
    const uint32_t n_below = kv_budget - kv_window;
    llama_context_ptr full = make_ctx(model, false);
    if (!full) {
        r.detail = "the full-cache context could not be created";
        return r;
    }
    const std::vector<float> l_full   = decode(full.get(), tokens, 0, n_below, 16);
    const std::vector<float> l_budget = decode(ctx, tokens, 0, n_below, 16);
    if (l_full.empty() || l_budget.size() != l_full.size()) {
        r.detail = "decoding below the budget failed";
        return r;
    }
    const double err = nmse(l_full, l_budget);
    if (!(err <= 1e-6)) {
        r.detail = "below the budget the logits differ from the full cache's (NMSE " + std::to_string(err) + ")";
        return r;
    }

    // 4x the budget: constant cells, evictions, finite logits
    std::vector<uint32_t> n_cells;
    const std::vector<float> l_long = decode(ctx, tokens, n_below, 4*kv_budget, 8, &n_cells);
    llama_kv_budget_info info;
    llama_kv_budget_get_info(ctx, &info);
    if (l_long.empty() || !all_finite(l_long)) {
        r.detail = l_long.empty() ? "decoding 4x the budget failed" : "non-finite logits under the budget";
        return r;
    }
    if (std::adjacent_find(n_cells.begin(), n_cells.end(), std::not_equal_to<>()) != n_cells.end()) {
        r.detail = "the cache's cells changed while decoding";
        return r;
    }
    if (info.n_evictions < 3 || info.n_used > kv_budget + kv_interval) {
        r.detail = "evictions " + std::to_string(info.n_evictions) + ", cells in use " + std::to_string(info.n_used);
        return r;
    }
    char buf[160];
    snprintf(buf, sizeof(buf), "%u budgeted layers, %u cells, %u evictions in %u tokens; below the budget NMSE %.1e",
            info.n_layer, info.n_cells, info.n_evictions, 4*kv_budget, err);
    r.verdict = "budget";
    r.detail  = buf;
    return r;
}

// out_dir: also save the fixture model there as ARCH.gguf (for the checks of morphkv inspect)
arch_result check_arch(llm_arch arch, bool moe, size_t seed, ggml_backend_dev_t dev, const std::string & out_dir,
        log_capture & lc) {
    gguf_context_ptr gguf_ctx = get_gguf_ctx(arch, moe);
    if (arch == LLM_ARCH_BAILINGMOE3) {
        gguf_remove_key(gguf_ctx.get(), "bailingmoe3.kda.safe_gate"); // as test-llama-archs does
    }
    llama_model_params mp = llama_model_default_params();
    mp.progress_callback = silent_model_load_progress;
    std::vector<ggml_backend_dev_t> devs = { dev, nullptr };
    mp.devices      = devs.data();
    mp.n_gpu_layers = -1; // every layer (and its cache) on dev
    tensor_data_params tp = { seed, 0.1f };
    llama_model_ptr model(llama_model_init_from_user(gguf_ctx.get(), set_tensor_data, &tp, mp));

    arch_result r;
    r.arch   = llm_arch_name(arch);
    r.config = moe ? "MoE" : "dense";
    if (!model) {
        r.verdict = "FAIL";
        r.detail  = "the fixture model could not be created";
        return r;
    }
    if (!out_dir.empty()) {
        llama_model_save_to_file(model.get(), (out_dir + "/" + r.arch + ".gguf").c_str());
    }

    lc.errors.clear();
    llama_context_ptr ctx = make_ctx(model.get(), true);
    if (!ctx) {
        const std::string why = first_line(lc.errors);
        const bool clear = why.find("kv_budget") != std::string::npos && why.find(r.arch) != std::string::npos &&
                           why.find("supported") != std::string::npos;
        r.verdict = clear ? "refused" : "FAIL";
        r.detail  = why.empty() ? "refused without a message" : why;
        return r;
    }
    const std::vector<llama_token> tokens = get_tokens(4*kv_budget, n_vocab, seed);
    arch_result b = check_budgeted(model.get(), ctx.get(), tokens);
    b.arch   = r.arch;
    b.config = r.config;
    return b;
}

} // namespace

int main(int argc, char ** argv) {
    common_init();
    std::string filter;
    std::string out_dir;
    std::string device;
    bool md = false;
    log_capture lc;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if ((a == "-a" || a == "--arch") && i + 1 < argc) {
            filter = argv[++i];
        } else if ((a == "-o" || a == "--out") && i + 1 < argc) {
            out_dir = argv[++i];
        } else if ((a == "-b" || a == "--backend") && i + 1 < argc) {
            device = argv[++i];
        } else if (a == "--md") {
            md = true;
        } else if (a == "-v") {
            lc.verbosity = 1;
        } else {
            fprintf(stderr, "usage: %s [-a ARCH|REGEX] [-b DEVICE (default: the CPU), e.g. CUDA0] "
                    "[-o DIR: also save each fixture model there] [--md] [-v]\n", argv[0]);
            return a == "-h" || a == "--help" ? 0 : 2;
        }
    }
    llama_backend_init();
    ggml_backend_load_all();
    ggml_backend_dev_t dev = device.empty() ? ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
                                            : ggml_backend_dev_by_name(device.c_str());
    if (!dev) {
        fprintf(stderr, "no device named %s (devices:", device.c_str());
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            fprintf(stderr, " %s", ggml_backend_dev_name(ggml_backend_dev_get(i)));
        }
        fprintf(stderr, ")\n");
        return 2;
    }
    llama_log_set(log_cb, &lc);

    const size_t seed = 1234;
    std::vector<arch_result> results;
    for (const llm_arch arch : llm_arch_all()) {
        if (arch == LLM_ARCH_UNKNOWN || !arch_matches(filter, arch)) {
            continue;
        }
        const bool moe = moe_mandatory(arch);
        if (arch == LLM_ARCH_GEMMA4 || arch == LLM_ARCH_GEMMA4_ASSISTANT || arch == LLM_ARCH_EAGLE3 ||
                arch == LLM_ARCH_DFLASH || !llama_model_saver_supports_arch(arch) || !arch_supported(arch)) {
            results.push_back({ llm_arch_name(arch), moe ? "MoE" : "dense", "untested", "no fixture in test-llama-archs" });
            continue;
        }
        results.push_back(check_arch(arch, moe, seed, dev, out_dir, lc));
        const auto & r = results.back();
        fprintf(stderr, "%-16s %-6s %-8s %s\n", r.arch.c_str(), r.config.c_str(), r.verdict.c_str(), r.detail.c_str());
    }

    int n_fail = 0;
    std::map<std::string, int> counts;
    if (md) {
        printf("| architecture | config | with a budget | detail |\n|---|---|---|---|\n");
    }
    for (const auto & r : results) {
        n_fail += r.verdict == "FAIL";
        counts[r.verdict]++;
        printf(md ? "| %s | %s | %s | %s |\n" : "%s\t%s\t%s\t%s\n", r.arch.c_str(), r.config.c_str(), r.verdict.c_str(),
                r.detail.c_str());
    }
    fprintf(stderr, "%d architectures: %d budgeted, %d refused, %d untested, %d failed\n", (int) results.size(),
            counts["budget"], counts["refused"], counts["untested"], n_fail);
    llama_log_set(nullptr, nullptr);
    llama_backend_free();
    return n_fail == 0 ? 0 : 1;
}
