#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time with cargo-fuzz (libFuzzer + ASan).
#   hack/fuzz.sh          20 s per target
#   hack/fuzz.sh 300      5 min per target
#   FUZZ_PROFILE=dev hack/fuzz.sh 40
#                         unoptimised, with overflow checks: builds in a third of the time
#                         (5 min against 15 on 2 cores) but runs 12-17x fewer inputs a second;
#                         CI's short smoke run takes it, long hunts want the default (release)
# Exits non-zero if a target crashes (or fails to build); the reproducer lands in
# fuzz/artifacts/<target>/ and `cargo fuzz run <target> <file>` replays it.
# Only a stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
set -uo pipefail
cd "$(dirname "$0")/.."

secs="${1:-20}"
case "$secs" in
  '' | *[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac
export RUSTC_BOOTSTRAP=1

profile=()
case "${FUZZ_PROFILE:-release}" in
  release) ;;
  dev) profile=(--dev) ;;
  *) echo "FUZZ_PROFILE must be release or dev, not '${FUZZ_PROFILE}'" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked || exit 1
fi

targets=$(cargo fuzz list) || exit 1
[ -n "$targets" ] || { echo "no fuzz targets found" >&2; exit 1; }
# One build for all targets, so the time limit below is spent fuzzing, not compiling.
if ! cargo fuzz build "${profile[@]}"; then
  echo "0 passed, $(echo "$targets" | wc -w) failed"
  exit 1
fi

passed=0
failed=0
failures=()
logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
for t in $targets; do
  mkdir -p "fuzz/corpus/$t"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
  echo "== $t: ${secs}s" >&2
  # New inputs go to fuzz/corpus/<target> (ignored by git); seeds/ is only read.
  if cargo fuzz run "${profile[@]}" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 >"$logs/$t.log" 2>&1; then
    passed=$((passed + 1))
    stats=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$t.log" | tail -1)
    echo "   ok   $t: ${stats:-done}" >&2
  else
    failed=$((failed + 1))
    failures+=("$t")
    tail -n 60 "$logs/$t.log" >&2
    echo "   FAIL $t (log: $logs/$t.log; reproducer in fuzz/artifacts/$t/)" >&2
  fi
done

[ "$failed" = 0 ] || echo "crashed: ${failures[*]}" >&2
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
