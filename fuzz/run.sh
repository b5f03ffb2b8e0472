#!/usr/bin/env bash
# The nightly fuzzing job: runs every fuzz target for FUZZ_SECONDS (default 60) each.
#
#   ./fuzz/run.sh                              # every target, 60 s each
#   FUZZ_SECONDS=3600 ./fuzz/run.sh            # a longer night
#   ./fuzz/run.sh request_head                 # only the targets named
#
# Needs the nightly toolchain (rustup toolchain install nightly); installs cargo-fuzz
# when it is missing. libFuzzer starts from the seeds in fuzz/corpus/<target>/ and grows
# its working corpus in fuzz/work/corpus/<target>/ (not checked in). It is not given
# fuzz/regressions/ (a reproducer not fixed yet would stop it at once; the stable test
# replays those). A crash is copied to
# fuzz/regressions/<target>/ and the job exits 1; `cargo test --test fuzz_corpus`
# (stable) then replays it until it is fixed.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_SANITIZER (address, the default, or
# none: faster, fine for safe Rust), FUZZ_TOOLCHAIN (nightly).
set -uo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz || exit 2
fi
rustup run "$toolchain" rustc --version >/dev/null || { echo "the $toolchain toolchain is not installed" >&2; exit 2; }

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +"$toolchain" fuzz list)
fi

status=0
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s (sanitizer: $sanitizer)"
    mkdir -p "work/corpus/$t" "corpus/$t" "regressions/$t" "artifacts/$t"
    before=$(ls "artifacts/$t" | wc -l)
    # -a: debug assertions and overflow checks on, as in `cargo test`.
    cargo +"$toolchain" fuzz run -a -s "$sanitizer" "$t" "work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
    rc=$?
    for f in "artifacts/$t"/*; do
        [ -f "$f" ] || continue
        cp -n "$f" "regressions/$t/"
    done
    after=$(ls "artifacts/$t" | wc -l)
    if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
        echo "!! $t failed (exit $rc); reproducers copied to fuzz/regressions/$t/:" >&2
        ls "artifacts/$t" >&2
        echo "   replay one with: cargo +$toolchain fuzz run $t fuzz/regressions/$t/<file>" >&2
        status=1
    fi
done
exit "$status"
