#!/usr/bin/env bash
# Stock vs patched llama.cpp on the GPU machine (H100/H200): decode speed at depth, long-prompt prefill,
# KV buffer and peak GPU memory, on synthetic GGUFs in real shapes (morphkv gguf synth).
# Run from the repository root after scripts/gpu_bench_prepare.sh packed .gpu/; results go to $OUT
# (default $MORPHKV_BENCH_WORK/out).
#   phase build: needs .gpu/llama-stock.tar.xz .gpu/llama-patched.tar.xz (+ gguf-py inside them),
#                .gpu/model.part.00 .gpu/model.part.01 and, if prepared, .gpu/llama-prev-src.tar.xz; builds
#                llama-bench for sm_90 from both trees in parallel and writes the synthetic models into
#                the work folder (resumable: a second `build` continues where a cut-off one stopped); with
#                the prev files, then also the "prev" build: those files swapped into the patched build,
#                built, its bin/ copied to build-prev/bin, the patched files swapped back and rebuilt
#   phase test:  needs .gpu/model.part.02 .gpu/model.part.03 .gpu/model.sha256 .gpu/llama_cpp_py.tar.xz;
#                the native-vs-NumPy-reference eviction tests (tests/test_kv_budget.py, incl. a model's own
#                attention scale: gguf-py from the patched tree) and the long-batch
#                tests (tests/test_long_batches.py, not the server) with the default model on the GPU (CUDA libllama)
#   phase run:   llama-bench per tree and budget (one process each, GPU memory sampled): JSON, logs and
#                memory samples into $OUT/run.tgz (unpack it for scripts/bench_summary.py); with a prev build,
#                also kv_budget=2048 from it for the shapes in MORPHKV_BENCH_PREV_SHAPES ("llama-3.1-8b")
#   phase kernel: the fused scoring op on the GPU (test-backend-ops -o KV_SCORES, test-kv-scores, whose
#                cases include both ways of the CUDA kernel: logits stored between its passes, and recomputed
#                for more than 32 query heads per KV head; and its perf), every architecture's fixture model
#                under a budget on the GPU (test-kv-budget-archs -b CUDA0), then on the 8B shape, per
#                MORPHKV_KERNEL_RUNS entry budget[:ab][:sN][:nN][:prev], a llama-bench run whose debug log
#                times every eviction's stages (inputs, order, read-back, gather, metadata) and, with :ab,
#                decode speed at MORPHKV_KERNEL_DEPTHS; :sN sets the eviction interval to N; :nN generates N
#                tokens in the :ab run (128; a larger N holds many consecutive decode-time evictions); :prev
#                runs the prev build
#   phase batched: llama-batched-bench (8B F16 shape), stock and patched in one run, per MORPHKV_BATCHED_RUNS
#                entry TREE:BUDGET:SEQUENCES:PROMPT[:pps] (pps: one prompt shared by the sequences, copied with
#                seq_cp, 128 tokens generated per sequence); log, JSON line and GPU memory samples per run
#   phase eval:  needs what test needs; `morphkv eval` on the GPU (CUDA libllama), MORPHKV_EVAL_JOBS
#                prompts at a time; eval.json etc. into $OUT/eval.tgz. MORPHKV_EVAL_SPLIT, MORPHKV_EVAL_BUDGETS
#                ("64,128"), MORPHKV_EVAL_TOKENS (answer tokens) and MORPHKV_EVAL_POLICIES set the run;
#                MORPHKV_EVAL_MODEL=gemma3-270m evaluates Gemma 3 270M instead, from .gpu/gemma3-270m.part.NN
#                (scripts/gpu_bench_prepare.sh writes them; any phase stages the pieces it carries)
# MORPHKV_BENCH_TREES="patched" builds (and later runs) only the patched tree; the patched tree also
# builds test-kv-scores and (unless MORPHKV_BENCH_OPS_TEST is set empty) test-backend-ops.
# Other knobs: MORPHKV_BENCH_SHAPES/DEPTHS/BUDGETS/PREFILL (build, run; a shape NAME:TYPE, e.g.
# llama-3.1-8b:q4_0, is written with those weights and measured for stock and kv_budget=2048 only);
# MORPHKV_KERNEL_RUNS ("1024 2048:ab 4096 2048:ab:s128"), MORPHKV_KERNEL_DEPTHS ("4096,16384"),
# MORPHKV_KERNEL_PERF (1: test-kv-scores perf) (kernel); MORPHKV_EVAL_JOBS, MORPHKV_EVAL_POLICIES (eval).
# Summarise here: unpack run.tgz into DIR, scripts/bench_summary.py DIR
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/gpu_model_parts.sh"
work="${MORPHKV_BENCH_WORK:-/tmp/mkvbench}"  # builds, models and scratch on the GPU machine
mkdir -p "$work"
: "${OUT:=$work/out}"
mkdir -p "$OUT"
shapes="${MORPHKV_BENCH_SHAPES:-llama-3.2-1b llama-3.1-8b llama-3.1-8b:q4_0}"
depths="${MORPHKV_BENCH_DEPTHS:-0,4096,16384,65536,131072}"
budgets="${MORPHKV_BENCH_BUDGETS:-1024 2048 4096}"
prefill="${MORPHKV_BENCH_PREFILL:-131072}"
trees="${MORPHKV_BENCH_TREES:-stock patched}"

configure() {  # tree
    [ -f "$work/build-$1/build.ninja" ] && return 0
    mkdir -p "$work/src-$1" && tar -xJf ".gpu/llama-$1.tar.xz" -C "$work/src-$1"
    cmake -S "$work/src-$1" -B "$work/build-$1" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=$([ "$1" = patched ] && echo ON || echo OFF) -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DGGML_CUDA_FA_QUANTS=f16-f16 > "$OUT/configure-$1.log" 2>&1
}

case "${1:?usage: gpu_bench.sh build|test|run|kernel|eval|batched}" in
build)
    stage_model_parts "$work"
    stage_parts gemma3-270m "$work"
    for t in $trees; do configure "$t"; done
    # the synthetic models are written while the two trees compile (8 jobs each)
    ( export PYTHONPATH="$work/src-patched/gguf-py:$PWD"
      for s in $shapes; do
          [ -f "$work/${s/:/-}.gguf" ] || python3 -m morphkv_gguf gguf synth "${s%%:*}" "$work/${s/:/-}.gguf" \
              --type "$([ "${s#*:}" = "$s" ] && echo f16 || echo "${s#*:}")"
      done > "$OUT/synth.log" 2>&1 ) &
    synth=$!
    n_trees=$(echo $trees | wc -w)
    pids=""
    for t in $trees; do
        targets="llama-bench llama-batched-bench"
        [ "$t" = patched ] && targets="llama-bench llama-batched-bench test-kv-scores test-kv-budget-archs ${MORPHKV_BENCH_OPS_TEST-test-backend-ops}"
        cmake --build "$work/build-$t" --target $targets -j $((16 / n_trees)) > "$OUT/build-$t.log" 2>&1 &
        pids="$pids $!"
    done
    for p in $pids; do wait $p; done
    wait $synth
    for t in $trees; do tail -1 "$OUT/build-$t.log"; done
    tail -1 "$OUT/synth.log"
    ls -la "$work"/*.gguf
    if [ -f .gpu/llama-prev-src.tar.xz ] && [ -f "$work/build-patched/build.ninja" ] && [ ! -x "$work/build-prev/bin/llama-bench" ]; then
        # only the files the newest patches change differ: built in the patched build dir (a few objects),
        # the binaries and libraries copied (llama-bench's RUNPATH yields to LD_LIBRARY_PATH), then swapped back
        swap="$work/prev-swap" src="$work/src-patched"
        rm -rf "$swap" && mkdir -p "$swap/old" "$swap/new"
        tar -xJf .gpu/llama-prev-src.tar.xz -C "$swap/old"
        (cd "$swap/old" && find . -type f | sed 's|^\./||') > "$swap/files"
        # the patched versions from the packed archive, not from the tree (a cut-off swap leaves it half old)
        tar -xJf .gpu/llama-patched.tar.xz -C "$swap/new" $(cat "$swap/files")
        while read -r f; do cp "$swap/old/$f" "$src/$f"; done < "$swap/files"
        cmake --build "$work/build-patched" --target llama-bench -j 16 > "$OUT/build-prev.log" 2>&1 \
            && mkdir -p "$work/build-prev/bin" && cp -a "$work/build-patched/bin/." "$work/build-prev/bin/"
        while read -r f; do cp "$swap/new/$f" "$src/$f"; touch "$src/$f"; done < "$swap/files"
        cmake --build "$work/build-patched" --target llama-bench test-kv-scores ${MORPHKV_BENCH_OPS_TEST-test-backend-ops} -j 16 \
            >> "$OUT/build-patched.log" 2>&1
        echo "prev: $(wc -l < "$swap/files") file(s) swapped; $(tail -1 "$OUT/build-prev.log"); patched again: $(tail -1 "$OUT/build-patched.log")"
    fi
    ;;
test|eval)
    join_model_parts "$work"
    stage_parts gemma3-270m "$work"
    mkdir -p "$work/py" "$work/stub" && tar -xJf .gpu/llama_cpp_py.tar.xz -C "$work/py"
    echo "class Cache: pass" > "$work/stub/diskcache.py"
    export PYTHONPATH="$work/py:$work/stub:$PWD:$work/src-patched/gguf-py" LLAMA_CPP_LIB_PATH="$work/build-patched/bin"
    export MORPHKV_MODEL="$work/model.gguf" MORPHKV_TEST_GPU_LAYERS=99
    if [ "$1" = eval ]; then
        # reference answers of an earlier run on this kind of machine, packed in .gpu/ (same answers, cheaper)
        [ -f .gpu/eval-cache.tgz ] && tar -xzf .gpu/eval-cache.tgz -C "$work"
        # click may be missing there: the evaluation is called directly (same code as `morphkv eval`);
        # the plots are drawn here from eval.json (morphkv eval --render)
        t0=$SECONDS
        model="$work/model.gguf"
        if [ "${MORPHKV_EVAL_MODEL:-}" = gemma3-270m ]; then
            model="$(join_parts gemma3-270m "$work")" || exit 1
        fi
        PYTHONUNBUFFERED=1 python3 -c "
import llama_cpp, sys
from morphkv_gguf import evaluation as ev
import os
e = os.environ
kw = {'model': sys.argv[3]}
if e.get('MORPHKV_EVAL_POLICIES'):
    kw['policies'] = ev.parse_policies(e['MORPHKV_EVAL_POLICIES'])
if e.get('MORPHKV_EVAL_BUDGETS'):
    kw['budgets'] = ev.parse_budgets(e['MORPHKV_EVAL_BUDGETS'])
if e.get('MORPHKV_EVAL_SPLIT'):
    kw['split'] = e['MORPHKV_EVAL_SPLIT']
if e.get('MORPHKV_EVAL_TOKENS'):
    kw['answer_tokens'] = int(e['MORPHKV_EVAL_TOKENS'])
cfg = ev.EvalConfig(gpu_layers=99, jobs=int(sys.argv[1]), cache_dir='$work/eval-cache', **kw)
doc = ev.run_eval(cfg)
ev.write_outputs(doc, sys.argv[2], plots=False)
print(open(sys.argv[2] + '/eval.md').read())" "${MORPHKV_EVAL_JOBS:-16}" "$work/eval" "$model" 2>&1 | tee "$OUT/eval.log" | grep -v '^\[prompt' | tail -40
        echo "eval: $((SECONDS - t0)) s"
        tar -C "$work" -czf "$OUT/eval.tgz" eval eval-cache
        exit 0
    fi
    python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(sys.argv[1:]))" tests/test_kv_budget.py tests/test_long_batches.py tests/test_multi_seq.py tests/test_kv_keep.py -q -p no:cacheprovider \
        -k "reference or streaming or memory_stays_constant or below_the_budget or one_call or first_eviction or attention_scale or sequence or keep" 2>&1 | tee "$OUT/pytest-cuda.txt" | tail -15
    ;;
run)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    bench() {  # name tree model extra-args...
        local name=$1 tree=$2 model=$3; shift 3
        [ -x "$work/build-$tree/bin/llama-bench" ] || { echo "$name: skipped ($tree not built)"; return 0; }
        : > "$OUT/$name.mem"  # exists even if the process ends before the sampler's first line
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >> "$OUT/$name.mem" &
        local smi=$!
        local t0=$SECONDS
        LD_LIBRARY_PATH="$work/build-$tree/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            "$work/build-$tree/bin/llama-bench" -m "$model" -ngl 99 -fa 1 -r 2 -o json --verbose "$@" \
            > "$OUT/$name.json" 2> "$OUT/$name.log" || echo "$name failed: $?" | tee -a "$OUT/failures.txt"
        kill $smi 2>/dev/null || true; wait $smi 2>/dev/null || true
        # the largest KV buffer of the process (llama-bench makes one context per depth)
        local kv; kv=$(grep -o 'KV buffer size = *[0-9.]* MiB' "$OUT/$name.log" | sort -t= -k2 -g | tail -1)
        echo "$name: $((SECONDS - t0)) s, peak $(sort -n "$OUT/$name.mem" | tail -1) MiB, ${kv:-KV ?}" | tee -a "$OUT/summary.txt"
        # every process's JSON, log and memory samples go into one archive (one file to copy back),
        # re-written after each process so that a run cut short still returns its part
        mkdir -p "$work/run" && mv "$OUT/$name".* "$work/run/" && tar -C "$work/run" -czf "$OUT/run.tgz" .
    }
    rm -rf "$work/run"
    for s in $shapes; do
        m="$work/${s/:/-}.gguf"
        if [ "${s#*:}" != "$s" ]; then  # quantized weights: stock and the headline budget only
            s="${s/:/-}"
            bench "$s-stock-tg" stock "$m" -p 0 -n 64 -d "$depths"
            bench "$s-kvb2048-tg" patched "$m" -p 0 -n 64 -d "$depths" -kvb 2048
            continue
        fi
        bench "$s-stock-tg" stock "$m" -p 0 -n 64 -d "$depths"
        bench "$s-patched-tg" patched "$m" -p 0 -n 64 -d "$depths"
        for c in $budgets; do
            bench "$s-kvb$c-tg" patched "$m" -p 0 -n 64 -d "$depths" -kvb "$c"
        done
        if [ -x "$work/build-prev/bin/llama-bench" ] && [[ " ${MORPHKV_BENCH_PREV_SHAPES:-llama-3.1-8b} " == *" $s "* ]]; then
            bench "$s-prev-kvb2048-tg" prev "$m" -p 0 -n 64 -d "$depths" -kvb 2048
        fi
        bench "$s-stock-pp" stock "$m" -p "$prefill" -n 0 -r 1
        bench "$s-kvb2048-pp" patched "$m" -p "$prefill" -n 0 -r 1 -kvb 2048
    done
    ;;
kernel)
    bin="$work/build-patched/bin"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    if [ -x "$bin/test-backend-ops" ]; then
        "$bin/test-backend-ops" test -o KV_SCORES -b CUDA0 > "$OUT/test-backend-ops-kv-scores.txt" 2>&1 || echo "test-backend-ops failed: $?"
        echo "test-backend-ops: $(grep -E "tests passed" "$OUT/test-backend-ops-kv-scores.txt" | tail -1)"
    fi
    "$bin/test-kv-scores" > "$OUT/test-kv-scores.txt" 2>&1 || echo "test-kv-scores failed: $?"
    echo "test-kv-scores: $(tail -1 "$OUT/test-kv-scores.txt")"
    if [ -x "$bin/test-kv-budget-archs" ]; then
        # every architecture's fixture model on the GPU with a budget (or refused), as CI runs it on the CPU
        "$bin/test-kv-budget-archs" -b CUDA0 > "$OUT/test-kv-budget-archs-cuda.tsv" 2> "$OUT/test-kv-budget-archs-cuda.log" \
            || echo "test-kv-budget-archs failed: $?"
        echo "test-kv-budget-archs -b CUDA0: $(tail -1 "$OUT/test-kv-budget-archs-cuda.log")"
    fi
    if [ "${MORPHKV_KERNEL_PERF:-1}" = 1 ]; then
        "$bin/test-kv-scores" perf > "$OUT/test-kv-scores-perf.txt" 2>&1 || echo "test-kv-scores perf failed: $?"
        echo "perf, fused / composed us:"
        grep -v "CUDA graph" "$OUT/test-kv-scores-perf.txt" | grep -A40 "^perf" | grep -i "cuda" | head -24
    fi
    m="$work/llama-3.1-8b.gguf"
    for run in ${MORPHKV_KERNEL_RUNS:-1024 2048:ab 4096 2048:ab:s128}; do
        IFS=: read -r c opt1 opt2 opt3 <<< "$run"
        case "$c" in ''|*[!0-9]*) echo "kernel run '$run': expected BUDGET[:ab][:sN][:nN][:prev], e.g. 2048:ab" >&2; exit 2 ;; esac
        ab=0; interval=(); tag="kvb$c"; bin="$work/build-patched/bin"; n_gen=128
        for o in $opt1 $opt2 $opt3; do
            case "$o" in
                ab) ab=1 ;;
                s[0-9]*) interval=(--kv-evict-interval "${o#s}"); tag="$tag-$o" ;;
                prev) bin="$work/build-prev/bin"; tag="$tag-prev" ;;
                n[0-9]*) n_gen="${o#n}"; tag="$tag-$o" ;;
                *) echo "kernel run '$run': unknown option '$o' (accepted: ab, sN, nN, prev)" >&2; exit 2 ;;
            esac
        done
        export LD_LIBRARY_PATH="$bin"
        # one process per run: llama-bench restores the depth's KV state from the previous test of the same
        # process, which would carry another budget's cells (and skip its evictions)
        if [ $ab = 1 ]; then
            "$bin/llama-bench" -m "$m" -ngl 99 -fa 1 -r 2 -o json --verbose -p 0 -n "$n_gen" \
                -d "${MORPHKV_KERNEL_DEPTHS:-4096,16384}" -kvb $c "${interval[@]}" > "$OUT/ab-$tag.json" 2> "$OUT/ab-$tag.log" \
                || echo "ab-$tag failed: $?"
            python3 - "$OUT/ab-$tag.json" "$tag" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"{sys.argv[2]:>16} d {r['n_depth']}: {r['avg_ts']:.1f} t/s")
PY
            log="$OUT/ab-$tag.log"
        else
            "$bin/llama-bench" -m "$m" -ngl 99 -fa 1 -r 1 -o json --verbose -p 0 -n 192 -d 4096 -kvb $c "${interval[@]}" \
                > "$OUT/evict-$tag.json" 2> "$OUT/evict-$tag.log" || echo "evict-$tag failed: $?"
            log="$OUT/evict-$tag.log"
        fi
        python3 "$(dirname "$0")/bench_summary.py" --evictions "$log" | sed "s/^/$tag: /"
        # the stages of the last evictions (the debug line of each)
        grep -h "budget_evict: eviction" "$log" | tail -2 | sed "s/.*budget_evict: /$tag: /"
    done
    cd "$OUT" && tar -czf kernel.tgz --remove-files ./*.txt ./*.json ./*.log
    ;;
batched)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    m="$work/llama-3.1-8b.gguf"
    for run in ${MORPHKV_BATCHED_RUNS:-stock:0:32:16384 patched:2048:32:16384 patched:2048:32:131072:pps}; do
        if ! [[ "$run" =~ ^(stock|patched):[0-9]+:[0-9]+:[0-9]+(:pps)?$ ]]; then
            echo "batched run '$run': expected TREE:BUDGET:SEQUENCES:PROMPT[:pps], TREE stock or patched" >&2; exit 2
        fi
        IFS=: read -r tree c npl npp pps <<< "$run"
        tag="$tree-kvb$c-$npl-x-$npp${pps:+-pps}"
        args=(-m "$m" -ngl 99 -fa 1 -c $((npl * (npp + 128))) -b 2048 -ub 512 -npp "$npp" -ntg 128 -npl "$npl" --output-format jsonl -lv 4)
        [ "$c" != 0 ] && args+=(--kv-budget "$c")
        [ -n "$pps" ] && args+=(-pps)
        : > "$OUT/batched-$tag.mem"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >> "$OUT/batched-$tag.mem" &
        smi=$!
        t0=$SECONDS
        LD_LIBRARY_PATH="$work/build-$tree/bin" timeout 570 "$work/build-$tree/bin/llama-batched-bench" "${args[@]}" \
            > "$OUT/batched-$tag.log" 2>&1 || echo "batched-$tag failed: $?"
        kill $smi 2>/dev/null || true; wait $smi 2>/dev/null || true
        kv=$(grep -o 'KV buffer size = *[0-9.]* MiB' "$OUT/batched-$tag.log" | tail -1 || true)
        echo "batched-$tag: $((SECONDS - t0)) s, peak $(sort -n "$OUT/batched-$tag.mem" | tail -1) MiB, ${kv:-KV ?}"
        grep '^{' "$OUT/batched-$tag.log" | tail -1 || true
    done
    ;;
*) echo "unknown phase '$1' (accepted: build, test, eval, kernel, run, batched)" >&2; exit 2 ;;
esac
