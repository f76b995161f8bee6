# Sourced by the GPU machine scripts (gpu_bench.sh, gpu_positions.sh, gpu_kv_budget.sh): the default model
# arrives in pieces (.gpu/model.part.NN from scripts/gpu_bench_prepare.sh, a few with each phase), staged in
# a work folder across phases and joined when all are there.

# stage_model_parts WORK: keep the pieces present in .gpu/
stage_model_parts() {
    local p
    for p in .gpu/model.part.*; do
        [ -f "$p" ] && cp "$p" "$1/"
    done
    return 0
}

# join_model_parts WORK: stage the pieces present, join all into WORK/model.gguf and check it against
# .gpu/model.sha256 (when present); exits with a message naming the pieces if they do not add up
join_model_parts() {
    stage_model_parts "$1"
    [ -f "$1/model.gguf" ] || cat "$1"/model.part.* > "$1/model.gguf"
    if [ -f .gpu/model.sha256 ] && [ "$(sha256sum < "$1/model.gguf" | cut -d' ' -f1)" != "$(cat .gpu/model.sha256)" ]; then
        echo "the default model's pieces do not add up (staged: $(cd "$1" && ls model.part.* | tr "\n" " ")); bring the" \
             "missing .gpu/model.part.* (scripts/gpu_bench_prepare.sh writes them and model.sha256)" >&2
        rm -f "$1/model.gguf"
        exit 1
    fi
}

# stage_parts NAME WORK: keep the pieces .gpu/NAME.part.* present (a second model, e.g. gemma3-270m)
stage_parts() {
    local p
    for p in .gpu/"$1".part.*; do
        [ -f "$p" ] && cp "$p" "$2/"
    done
    return 0
}

# join_parts NAME WORK: join the staged pieces into WORK/NAME.gguf, checked against .gpu/NAME.sha256; prints the path
join_parts() {
    stage_parts "$1" "$2"
    local out="$2/$1.gguf"
    [ -f "$out" ] || cat "$2/$1".part.* > "$out" 2>/dev/null
    if [ ! -f ".gpu/$1.sha256" ] || [ "$(sha256sum < "$out" | cut -d' ' -f1)" != "$(cat ".gpu/$1.sha256")" ]; then
        echo "the pieces of $1 do not add up (staged: $(cd "$2" && ls "$1".part.* 2>/dev/null | tr "\n" " ")); bring the" \
             "missing .gpu/$1.part.* and .gpu/$1.sha256 (MORPHKV_GPU_MODELS=$1 scripts/gpu_bench_prepare.sh)" >&2
        rm -f "$out"
        return 1
    fi
    echo "$out"
}
