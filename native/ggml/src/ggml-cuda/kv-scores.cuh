#include "common.cuh"

void ggml_cuda_op_kv_scores(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
bool ggml_cuda_kv_scores_supported(const ggml_tensor * op);
